"""DyVM training and evaluation (DeiT-style harness; single process or torchrun).

    torchrun --nproc_per_node=4 main.py --config configs/vim-s.yaml --model-path vim_s_midclstok_80p5acc.pth \
        --data-path /imagenet --output_dir output/vim-s
    python main.py --config configs/vim-s.yaml --model-path output/vim-s/best_checkpoint.pth --eval ...

--model Vim-Tiny/Small/Base (the authors' names) or dyvm_vim_*: a DyVM student distilled from the frozen dense
Vim of --teacher-path (default --model-path). --model vim_*: a plain dense Vim trained with the classification
loss (the demo's teacher stage). Flags: dyvm/config.py. Outputs in --output_dir: args.yaml, checkpoint.pth,
best_checkpoint.pth, log.txt (one JSON line per epoch), tensorboard events, eval.json (--eval).
`python main.py seg ...`: semantic segmentation (UperNet on a Vim or DyVM backbone), options in dyvm/seg/config.py.
"""
import json
import os
import random
import sys
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import dyvm  # noqa: F401  (registers the timm model names)
from dyvm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dyvm.config import ConfigError, parse_args, save_args
from dyvm.data import DataError, build_datasets, build_loaders, describe, set_epoch
from dyvm.engine import (AuxForward, ClassificationLoss, ModelOptionError, NonFiniteLossError, build_model, evaluate,
                         global_batch_lr, is_dynamic, train_one_epoch, unwrap)
from dyvm.models.registry import resolve_model_name


def build_dense_twin(model: nn.Module) -> nn.Module:
    """A dense Vim with the student's configuration (random weights): a timing/FLOPs baseline."""
    from dyvm.models.vim import Vim
    return Vim(model.cfg)


def build_criterion(args, model: nn.Module, teacher: Optional[nn.Module], mixup_active: bool) -> nn.Module:
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if args.bce_loss:
        base = BinaryCrossEntropy(smoothing=0.0 if mixup_active else args.smoothing)
    elif mixup_active:
        base = SoftTargetCrossEntropy()  # mixup already smoothed the targets
    elif args.smoothing:
        base = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        base = nn.CrossEntropyLoss()
    dyvm_cfg = getattr(model, "dyvm_cfg", None)
    if dyvm_cfg is None:
        return ClassificationLoss(base)
    from dyvm.losses import DyVMLoss
    # keep-ratio targets come from the model's own config, so loss and pruning cannot disagree
    return DyVMLoss.from_model(model, base, teacher, clf_weight=args.clf_weight,
                               token_weight=args.token_pruning_weight, block_weight=args.block_pruning_weight,
                               distill_weight=args.distill_weight, token_distill=args.token_distill)


def init_distributed(args) -> tuple:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: NCCL on GPU, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", args.local_rank))
    want = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(want)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world_size, rank, device


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def epoch_seed(args, epoch: int, rank: int) -> int:
    """Every epoch starts from its own seed, so a resumed run replays exactly what a straight run does."""
    return args.seed * 1_000_003 + epoch * 1009 + rank


def teacher_path_for(args, resumed: Optional[dict]) -> str:
    if args.teacher_path:
        return args.teacher_path
    if resumed is not None and resumed.get("teacher_path"):
        return resumed["teacher_path"]
    return args.model_path


def load_teacher(args, model: nn.Module, path: str, device) -> Optional[nn.Module]:
    if not path:
        return None
    from dyvm.losses import build_teacher
    return build_teacher(model.cfg, path).to(device)


def valid_samples(n_val: int, world_size: int, rank: int, dist_eval: bool) -> Optional[int]:
    """How many of this rank's evaluation samples are real: timm's OrderedDistributedSampler deals indices
    round-robin and pads the end of the short ranks' streams by wrapping around."""
    if world_size == 1 or not dist_eval:
        return None
    return max(0, (n_val + world_size - 1 - rank) // world_size)


def print0(rank: int, *msg):
    if rank == 0:
        print(*msg, flush=True)


def run_eval(args, model, ema_state, splits, val_loader, device, world_size, rank, amp_dtype, teacher_path):
    from dyvm.benchmark import measure_throughput
    from dyvm.flops import nominal_macs
    n_valid = valid_samples(len(splits.val), world_size, rank, args.dist_eval)
    ev = dict(amp_dtype=amp_dtype, valid_samples=n_valid, distributed=args.dist_eval, progress=args.progress)
    res = {"model": args.model, "parameters": sum(p.numel() for p in unwrap(model).parameters()),
           "num_patches": unwrap(model).cfg.num_patches}
    res["raw"] = evaluate(model, val_loader, device, desc="eval raw", **ev)
    if ema_state is not None:
        ema_model = build_model(args, unwrap(model).cfg.num_classes)
        load_checkpoint(ema_model, ema_state)  # also a dense EMA into a DyVM (fresh heads, as for the raw model)
        ema_model.to(device)
        res["ema"] = evaluate(ema_model, val_loader, device, desc="eval EMA", **ev)
    base = unwrap(model)
    kw = dict(batch_size=args.throughput_batch_size, img_size=args.input_size, in_chans=args.in_chans,
              device=device, dtype=amp_dtype, warmup=max(2, args.throughput_iters // 3), iters=args.throughput_iters)
    timed = args.throughput and rank == 0
    graphed = timed and args.throughput_cuda_graph and torch.device(device).type == "cuda"
    if timed:
        res["throughput"] = measure_throughput(base, **kw)
    if graphed:
        res["throughput_cuda_graph"] = measure_throughput(base, cuda_graph=True, **kw)
    if getattr(base, "dyvm_cfg", None) is not None:  # the dense teacher, timed in the same run
        dense = build_dense_twin(base).to(device)
        note = "random weights (timing and FLOPs only)"
        if teacher_path:
            try:
                load_checkpoint(dense, teacher_path)
                note = teacher_path
            except CheckpointError:
                pass
        res["teacher"] = {"weights": note, "parameters": sum(p.numel() for p in dense.parameters())}
        res["teacher"]["gmacs_paper"], res["teacher"]["gmacs_full"] = (v / 1e9 for v in nominal_macs(dense))
        if timed:
            res["teacher"]["throughput"] = measure_throughput(dense, **kw)
            res["speedup_vs_teacher"] = (res["throughput"]["images_per_s"]
                                         / res["teacher"]["throughput"]["images_per_s"])
        if graphed:
            res["teacher"]["throughput_cuda_graph"] = measure_throughput(dense, cuda_graph=True, **kw)
            res["speedup_vs_teacher_cuda_graph"] = (res["throughput_cuda_graph"]["images_per_s"]
                                                    / res["teacher"]["throughput_cuda_graph"]["images_per_s"])
    return res


def summarize_eval(res: dict) -> str:
    raw = res["raw"]
    lines = [f"{res['model']}: {res['parameters']:,} parameters, {raw['num_images']} images",
             f"  top-1 {raw['acc1']:.2f}  top-5 {raw['acc5']:.2f}  (raw model)"]
    if "ema" in res:
        lines.append(f"  top-1 {res['ema']['acc1']:.2f}  top-5 {res['ema']['acc5']:.2f}  (EMA)")
    lines.append(f"  MACs/image as run: {raw['gmacs_paper']:.4f} G paper convention (one scan direction), "
                 f"{raw['gmacs_full']:.4f} G full (both directions)")
    if "tokens_kept_per_stage" in raw:
        lines.append(f"  tokens kept per stage: {raw['tokens_kept_per_stage']} "
                     f"(ratios {raw['token_keep_ratio_per_stage']})")
    if "block_keep_ratio" in raw:
        lines.append(f"  block keep ratio: {raw['block_keep_ratio']:.4f} overall; per layer [fwd, bwd]: "
                     f"{raw['block_keep_per_layer']}")
    t = res.get("teacher")
    if t is not None:
        lines.append(f"  dense teacher ({t['weights']}): {t['gmacs_paper']:.4f} G paper / {t['gmacs_full']:.4f} G full")
    if "throughput" in res:
        tp = res["throughput"]
        text = f"  images/s: model {tp['images_per_s']:.1f}"
        if t is not None and "throughput" in t:
            text += f", dense teacher {t['throughput']['images_per_s']:.1f} (x{res['speedup_vs_teacher']:.2f})"
        lines.append(text + f" (batch {tp['batch_size']}, median of {tp['iters']} timed batches)")
    if "throughput_cuda_graph" in res:
        text = f"  images/s, CUDA graph: model {res['throughput_cuda_graph']['images_per_s']:.1f}"
        if t is not None and "throughput_cuda_graph" in t:
            text += (f", dense teacher {t['throughput_cuda_graph']['images_per_s']:.1f} "
                     f"(x{res['speedup_vs_teacher_cuda_graph']:.2f})")
        lines.append(text + " (the GPU's throughput without Python's launch overhead)")
    return "\n".join(lines)


def run(args) -> dict:
    from timm.data import Mixup
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    world_size, rank, device = init_distributed(args)
    seed_everything(args.seed)  # the same on every rank: fresh heads (and their EMA copies) start identical
    if args.output_dir and rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        save_args(args, args.output_dir)

    splits = build_datasets(args)
    num_classes = args.nb_classes or splits.num_classes
    if num_classes < splits.num_classes:
        raise ConfigError(f"--nb-classes {num_classes} is smaller than the {splits.num_classes} classes of the data")
    train_loader, val_loader = build_loaders(splits, args, world_size, rank)
    print0(rank, f"data: {args.data_set} {describe(splits)}; {world_size} process(es) on {device}")

    model = build_model(args, num_classes)
    resumed = None
    if args.resume:
        resumed = torch.load(args.resume, map_location="cpu", weights_only=False)
        if "model" not in resumed or "epoch" not in resumed:
            raise CheckpointError(f"--resume {args.resume} is not a training checkpoint of main.py (needs 'model' "
                                  "and 'epoch'); to start from weights use --model-path")
        model.load_state_dict(resumed["model"])
        print0(rank, f"resuming from {args.resume} (epoch {resumed['epoch']} done)")
    elif args.model_path:
        report = load_checkpoint(model, args.model_path)
        print0(rank, f"model: {args.model_path}: {report.summary()}")
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print0(rank, f"model: {resolve_model_name(args.model, is_dynamic(args.model))}, {n_params:,} parameters")
    amp_dtype = getattr(torch, args.amp_dtype) if args.amp else None
    teacher_path = teacher_path_for(args, resumed)

    if args.eval:
        ema_state = None
        if args.model_path and not args.resume:
            ckpt = torch.load(args.model_path, map_location="cpu", weights_only=False)
            if isinstance(ckpt, dict) and "model_ema" in ckpt:
                ema_state = ckpt["model_ema"]
                teacher_path = args.teacher_path or ckpt.get("teacher_path") or teacher_path
        elif resumed is not None:
            ema_state = resumed.get("model_ema")
        res = run_eval(args, model, ema_state, splits, val_loader, device, world_size, rank, amp_dtype,
                       teacher_path)
        print0(rank, summarize_eval(res))
        if args.output_dir and rank == 0:
            with open(os.path.join(args.output_dir, "eval.json"), "w") as f:
                json.dump(res, f, indent=1)
        return res

    teacher = None
    if getattr(model, "dyvm_cfg", None) is not None and args.teacher and args.distill_weight > 0:
        if not teacher_path:
            raise ConfigError("DyVM training distils from a dense teacher: give --model-path (dense Vim) or "
                              "--teacher-path, or pass --no-teacher")
        teacher = load_teacher(args, model, teacher_path, device)
        print0(rank, f"teacher: frozen dense Vim from {teacher_path}")

    mixup_active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if mixup_active and args.batch_size % 2:
        raise ConfigError(f"mixup/cutmix need an even --batch-size, got {args.batch_size}")
    mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                     prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                     label_smoothing=args.smoothing, num_classes=num_classes) if mixup_active else None
    criterion = build_criterion(args, model, teacher, mixup_active)

    steps_per_epoch = len(train_loader) if args.max_steps_per_epoch is None else min(args.max_steps_per_epoch,
                                                                                     len(train_loader))
    lr = global_batch_lr(args.lr, args.batch_size, world_size, args.unscale_lr)
    opt_kw = optimizer_kwargs(cfg=args)
    opt_kw["lr"] = lr
    optimizer = create_optimizer_v2(model, **opt_kw)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        cooldown_epochs=args.cooldown_epochs, patience_epochs=args.patience_epochs, decay_rate=args.decay_rate,
        min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, noise=args.lr_noise,
        noise_pct=args.lr_noise_pct, noise_std=args.lr_noise_std, noise_seed=args.seed,
        step_on_epochs=not args.sched_on_updates, updates_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type) if args.amp and args.amp_dtype == "float16" else None
    ema = None
    if args.model_ema:
        ema = ModelEmaV3(model, decay=args.model_ema_decay,
                         device=torch.device("cpu") if args.model_ema_force_cpu else None)

    start_epoch, max_acc, global_step = args.start_epoch, -1.0, 0  # -1: the first epoch is always the best yet
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["lr_scheduler"])
        if scaler is not None and resumed.get("scaler") is not None:
            scaler.load_state_dict(resumed["scaler"])
        if ema is not None and resumed.get("model_ema") is not None:
            ema.module.load_state_dict(resumed["model_ema"])
        start_epoch, max_acc = resumed["epoch"] + 1, resumed.get("max_accuracy", 0.0)
        global_step = resumed.get("global_step", 0)

    train_model = AuxForward(model)
    if world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)  # e.g. predictors of a stage no sample reached

    writer = None
    if args.output_dir and rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(args.output_dir, "tensorboard"))
    n_valid = valid_samples(len(splits.val), world_size, rank, args.dist_eval)
    ev = dict(amp_dtype=amp_dtype, valid_samples=n_valid, distributed=args.dist_eval, progress=args.progress)
    print0(rank, f"training epochs {start_epoch}..{num_epochs - 1}, lr {lr:.3g} (global batch "
                 f"{args.batch_size * world_size}), output {args.output_dir or '(none)'}")
    stats = {}
    last_epoch = num_epochs if args.stop_epoch is None else min(num_epochs, args.stop_epoch)
    for epoch in range(start_epoch, last_epoch):
        t0 = time.time()
        seed_everything(epoch_seed(args, epoch, rank))
        set_epoch(train_loader, epoch)
        train_stats = train_one_epoch(train_model, criterion, train_loader, optimizer, device, epoch,
                                      mixup_fn=mixup_fn, clip_grad=args.clip_grad, ema=ema, amp_dtype=amp_dtype,
                                      scaler=scaler, max_steps=args.max_steps_per_epoch, progress=args.progress,
                                      global_step=global_step, scheduler=scheduler if args.sched_on_updates else None)
        global_step += train_stats["steps"]
        scheduler.step(epoch + 1)  # the correct epoch (DeiT's step(epoch) ran epochs 0 and 1 both at warmup-lr)
        test_stats = evaluate(model, val_loader, device, desc=f"epoch {epoch} eval", **ev)
        ema_stats = (evaluate(ema.module, val_loader, device, desc=f"epoch {epoch} eval EMA", **ev)
                     if ema is not None and args.eval_ema_each_epoch else {})
        is_best = test_stats["acc1"] > max_acc
        max_acc = max(max_acc, test_stats["acc1"])
        if args.output_dir and rank == 0:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "lr_scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                     "model_ema": ema.module.state_dict() if ema is not None else None, "epoch": epoch,
                     "global_step": global_step, "max_accuracy": max_acc, "args": vars(args),
                     "teacher_path": teacher_path if teacher is not None else ""}
            save_checkpoint(state, os.path.join(args.output_dir, "checkpoint.pth"))
            if is_best:
                save_checkpoint(state, os.path.join(args.output_dir, "best_checkpoint.pth"))
        stats = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()},
                 **{f"test_{k}": v for k, v in test_stats.items()},
                 **{f"ema_test_{k}": v for k, v in ema_stats.items() if not isinstance(v, list)},
                 "max_accuracy": max_acc, "n_parameters": n_params, "epoch_time_s": round(time.time() - t0, 2)}
        print0(rank, f"epoch {epoch}: loss {train_stats['loss']:.4f}, val top-1 {test_stats['acc1']:.2f} "
                     f"(EMA {ema_stats.get('acc1', float('nan')):.2f}, best {max_acc:.2f}), "
                     f"{test_stats['gmacs_paper']:.4f} G paper MACs, {stats['epoch_time_s']:.0f} s")
        if writer is not None:
            for k, v in stats.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    writer.add_scalar(k, v, epoch)
            writer.flush()
        if args.output_dir and rank == 0:
            with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
                f.write(json.dumps(stats) + "\n")
    if writer is not None:
        writer.close()
    return stats


def one_line(e: BaseException) -> str:
    """The last line of a message (DataLoader workers wrap errors in their traceback text)."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else type(e).__name__
    name = f"{type(e).__name__}: "
    if name in last and last.split(name, 1)[0].replace(".", "").replace("_", "").isalnum() or last.startswith(name):
        return last.split(name, 1)[1]  # "pkg.module.SomeError: message" -> "message"
    return last


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["seg"]:  # semantic segmentation (dyvm/seg/run.py): its own options
        from dyvm.seg.run import main as seg_main
        return seg_main(argv[1:])
    try:
        args = parse_args(argv)
        run(args)
    except (ConfigError, ModelOptionError, DataError, CheckpointError, NonFiniteLossError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
