"""DyVM training and evaluation (DeiT-style harness; single process or torchrun).

    torchrun --nproc_per_node=4 main.py --config configs/vim-s.yaml --model-path vim_s_midclstok_80p5acc.pth \
        --data-path /imagenet --output_dir output/vim-s
    python main.py --config configs/vim-s.yaml --model-path output/vim-s/best_checkpoint.pth --eval ...

--model Vim-Tiny/Small/Base (the authors' names; also VideoMamba-* and MambaReg-*) or dyvm_vim_* (dyvm_videomamba_*,
dyvm_mambareg_*): a DyVM student distilled from the frozen dense model of its backbone from --teacher-path (default
--model-path). --model vim_* (videomamba_*, mambareg_*): a plain dense model trained with the classification
loss (the demo's teacher stage). Flags: dyvm/config.py. Outputs in --output_dir: args.yaml, checkpoint.pth,
best_checkpoint.pth (format: dyvm/checkpoint.py), log.txt (one JSON line per epoch), tensorboard events;
--eval writes eval.json and eval_args.yaml (dyvm/report.py).
`python main.py seg ...`: semantic segmentation (UperNet on a Vim or DyVM backbone), options in dyvm/seg/config.py.
"""
import dyvm  # noqa: F401  (first: thread settings that do not spin, before torch loads; registers the models)

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from dyvm.checkpoint import (CheckpointError, load_checkpoint, load_training_checkpoint, read_checkpoint,
                             recorded_teacher_path, restore_training_state, save_training_checkpoint,
                             training_state)
from dyvm.cli import check_kernel_settings, run_cli
from dyvm.config import ConfigError, apply_tf32, parse_args, save_args, show_progress
from dyvm.data import DataError, build_datasets, build_loaders, describe, set_epoch
from dyvm.engine import (AuxForward, ClassificationLoss, ModelOptionError, NonFiniteLossError, build_model, evaluate,
                         global_batch_lr, init_distributed, seed_everything, train_one_epoch)
from dyvm.models.registry import resolve
from dyvm.report import eval_report, summarize_eval

# The errors that main.py prints as one line (`error: ...`) instead of a traceback.
USER_ERRORS = (ConfigError, ModelOptionError, DataError, CheckpointError, NonFiniteLossError)
# --teacher-dtype -> the teacher's autocast dtype ("auto": the training's own; None: fp32)
TEACHER_DTYPES = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}


@dataclass
class Session:
    """What training and --eval both start from: processes, data, and the model with its weights loaded.
    source: the checkpoint dict the weights came from (a --resume or a --model-path file), None if none."""
    args: object
    world_size: int
    rank: int
    device: torch.device
    splits: object
    train_loader: object
    val_loader: object
    num_classes: int
    model: nn.Module
    source: Optional[dict]
    amp_dtype: Optional[torch.dtype]

    def print(self, *msg):
        if self.rank == 0:
            print(*msg, flush=True)

    def eval_kw(self) -> dict:
        """dyvm.engine.evaluate's options for this run."""
        n_valid = valid_samples(len(self.splits.val), self.world_size, self.rank, self.args.dist_eval)
        return dict(amp_dtype=self.amp_dtype, valid_samples=n_valid, distributed=self.args.dist_eval,
                    progress=show_progress(self.args.progress), cuda_graph=self.args.cuda_graph_eval)


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
                               distill_weight=args.distill_weight, token_distill=args.token_distill,
                               teacher_dtype=TEACHER_DTYPES[args.teacher_dtype])


def epoch_seed(args, epoch: int, rank: int) -> int:
    """Every epoch starts from its own seed, so a resumed run replays exactly what a straight run does."""
    return args.seed * 1_000_003 + epoch * 1009 + rank


def valid_samples(n_val: int, world_size: int, rank: int, dist_eval: bool) -> Optional[int]:
    """How many of this rank's evaluation samples are real: timm's OrderedDistributedSampler deals indices
    round-robin and pads the end of the short ranks' streams by wrapping around."""
    if world_size == 1 or not dist_eval:
        return None
    return max(0, (n_val + world_size - 1 - rank) // world_size)


def load_weights(args, model: nn.Module, say) -> Optional[dict]:
    """--resume (a training checkpoint) or --model-path (any Vim / DyVM file) into the model -> that file's dict."""
    if args.resume:
        ckpt = load_training_checkpoint(args.resume)
        load_checkpoint(model, ckpt["model"])
        say(f"resuming from {args.resume} (epoch {ckpt['epoch']} done)")
        return ckpt
    if args.model_path:
        say(f"model: {args.model_path}: {load_checkpoint(model, args.model_path).summary()}")
        ckpt = read_checkpoint(args.model_path)
        return ckpt if isinstance(ckpt, dict) else None
    return None


def prepare(args) -> Session:
    """Processes, seeds, output folder, data, model and weights: what training and --eval share."""
    check_kernel_settings()
    world_size, rank, device = init_distributed(args)
    seed_everything(args.seed)  # the same on every rank: fresh heads (and their EMA copies) start identical
    if args.output_dir and rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        save_args(args, args.output_dir, "eval_args.yaml" if args.eval else "args.yaml")
    splits = build_datasets(args, training=not args.eval)
    num_classes = args.nb_classes or splits.num_classes
    if num_classes < splits.num_classes:
        raise ConfigError(f"--nb-classes {num_classes} is smaller than the {splits.num_classes} classes of the data")
    train_loader, val_loader = build_loaders(splits, args, world_size, rank, training=not args.eval)
    say = (lambda *m: print(*m, flush=True)) if rank == 0 else (lambda *m: None)
    for note in getattr(args, "_notes", ()):
        say(note)
    say(f"data: {args.data_set} {describe(splits)}; {world_size} process(es) on {device}")
    model = build_model(args, num_classes)
    source = load_weights(args, model, say)
    model.to(device)
    say(f"model: {resolve(args.model).timm_name}, {sum(p.numel() for p in model.parameters()):,} parameters")
    amp_dtype = getattr(torch, args.amp_dtype) if args.amp else None
    apply_tf32(args, device, say)
    return Session(args, world_size, rank, device, splits, train_loader, val_loader, num_classes, model, source,
                   amp_dtype)


def teacher_path_for(s: Session) -> str:
    """--teacher-path, else the teacher recorded in the checkpoint the weights came from (resolved against its
    folder), else (a fresh run) the starting checkpoint --model-path."""
    args = s.args
    if args.teacher_path:
        return args.teacher_path
    where = args.resume or args.model_path
    recorded = recorded_teacher_path(s.source, where) if s.source is not None else None
    if recorded:
        return recorded
    return "" if args.resume or args.eval else args.model_path


def run_evaluation(s: Session) -> dict:
    """--eval: the report of dyvm/report.py, printed and written to eval.json."""
    args = s.args
    ema_model = None
    ema_state = s.source.get("model_ema") if s.source is not None else None
    if ema_state is not None:
        ema_model = build_model(args, s.num_classes)
        load_checkpoint(ema_model, ema_state)  # also a dense EMA into a DyVM (fresh heads, as for the raw model)
        ema_model.to(s.device)
    teacher_path = teacher_path_for(s)
    if teacher_path and not os.path.isfile(teacher_path):
        s.print(f"note: teacher {teacher_path} not found; accuracy needs no teacher, and the dense baseline "
                "below is its dense twin (timing and FLOPs need no weights)")
    res = eval_report(args, s.model, ema_model, s.val_loader, s.eval_kw(), s.rank, teacher_path)
    s.print(summarize_eval(res))
    if args.output_dir and s.rank == 0:
        with open(os.path.join(args.output_dir, "eval.json"), "w") as f:
            json.dump(res, f, indent=1)
    return res


def build_teacher_for(s: Session) -> tuple:
    """(the frozen dense teacher or None, its path) for DyVM training with distillation."""
    args, model = s.args, s.model
    if getattr(model, "dyvm_cfg", None) is None or not args.teacher or args.distill_weight <= 0:
        return None, ""
    path = teacher_path_for(s)
    if not path:
        raise ConfigError(f"DyVM training distils from a dense teacher: give --model-path (dense "
                          f"{model.cfg.family}) or --teacher-path, or pass --no-teacher")
    if not os.path.isfile(path):
        raise ConfigError(f"the teacher {path} (recorded in {args.resume or args.model_path}) does not exist: "
                          "give --teacher-path, or pass --no-teacher")
    from dyvm.losses import build_teacher
    teacher = build_teacher(model, path).to(s.device)
    s.print(f"teacher: frozen dense {model.cfg.family} from {path}")
    return teacher, path


@dataclass
class Optimization:
    """Everything that updates the weights, built from the flags (timm's factories)."""
    optimizer: object
    scheduler: object
    num_epochs: int
    lr: float
    scaler: Optional[torch.amp.GradScaler]
    ema: object
    mixup_fn: object
    criterion: nn.Module
    graph_step: object = None  # dyvm.train_graph.GraphedTrainStep with --cuda-graph-train, else None


def build_optimization(s: Session, teacher: Optional[nn.Module]) -> Optimization:
    from timm.data import Mixup
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler_v2
    from dyvm.ema import ModelEma

    args, model = s.args, s.model
    mixup_active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if mixup_active and args.batch_size % 2:
        raise ConfigError(f"mixup/cutmix need an even --batch-size, got {args.batch_size}")
    mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                     prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                     label_smoothing=args.smoothing, num_classes=s.num_classes) if mixup_active else None
    steps_per_epoch = min(args.max_steps_per_epoch or len(s.train_loader), len(s.train_loader))
    lr = global_batch_lr(args.lr, args.batch_size, s.world_size, args.unscale_lr)
    opt_kw = {**optimizer_kwargs(cfg=args), "lr": lr}
    if args.cuda_graph_train is not False and s.device.type == "cuda" and args.opt.lower() in ("adam", "adamw"):
        opt_kw.update(fused=True, capturable=True)  # an update that a CUDA graph can capture
    optimizer = create_optimizer_v2(model, **opt_kw)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        cooldown_epochs=args.cooldown_epochs, patience_epochs=args.patience_epochs, decay_rate=args.decay_rate,
        min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, noise=args.lr_noise,
        noise_pct=args.lr_noise_pct, noise_std=args.lr_noise_std, noise_seed=args.seed,
        step_on_epochs=not args.sched_on_updates, updates_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler(s.device.type) if args.amp and args.amp_dtype == "float16" else None
    ema = ModelEma(model, decay=args.model_ema_decay,
                     device=torch.device("cpu") if args.model_ema_force_cpu else None) if args.model_ema else None
    return Optimization(optimizer, scheduler, num_epochs, lr, scaler, ema, mixup_fn,
                        build_criterion(args, model, teacher, mixup_active))


def run_epoch(s: Session, opt: Optimization, train_model: nn.Module, epoch: int, global_step: int) -> tuple:
    """Train one epoch, evaluate the model (and its EMA if asked) -> (train stats, val stats, EMA stats)."""
    args = s.args
    seed_everything(epoch_seed(args, epoch, s.rank))
    set_epoch(s.train_loader, epoch)
    train_stats = train_one_epoch(train_model, opt.criterion, s.train_loader, opt.optimizer, s.device, epoch,
                                  mixup_fn=opt.mixup_fn, clip_grad=args.clip_grad, ema=opt.ema,
                                  amp_dtype=s.amp_dtype, scaler=opt.scaler, max_steps=args.max_steps_per_epoch,
                                  progress=show_progress(args.progress), global_step=global_step,
                                  scheduler=opt.scheduler if args.sched_on_updates else None,
                                  graph_step=opt.graph_step)
    opt.scheduler.step(epoch + 1)  # the correct epoch (DeiT's step(epoch) ran epochs 0 and 1 both at warmup-lr)
    test_stats = evaluate(s.model, s.val_loader, s.device, desc=f"epoch {epoch} eval", **s.eval_kw())
    ema_stats = {}
    if opt.ema is not None and args.eval_ema_each_epoch:
        ema_stats = evaluate(opt.ema.module, s.val_loader, s.device, desc=f"epoch {epoch} eval EMA", **s.eval_kw())
    return train_stats, test_stats, ema_stats


def log_epoch(s: Session, writer, stats: dict) -> None:
    if writer is not None:
        for k, v in stats.items():
            if isinstance(v, (int, float)) and k != "epoch":
                writer.add_scalar(k, v, stats["epoch"])
        writer.flush()
    if s.args.output_dir and s.rank == 0:
        with open(os.path.join(s.args.output_dir, "log.txt"), "a") as f:
            f.write(json.dumps(stats) + "\n")


def run_training(s: Session) -> dict:
    """The epoch loop: train, evaluate, checkpoint (atomically), one JSON line per epoch in log.txt."""
    args, model = s.args, s.model
    teacher, teacher_path = build_teacher_for(s)
    opt = build_optimization(s, teacher)
    start_epoch, max_acc, global_step = args.start_epoch, -1.0, 0  # -1: the first epoch is always the best yet
    if args.resume:
        start_epoch, max_acc, global_step = restore_training_state(s.source, opt.optimizer, opt.scheduler,
                                                                   opt.scaler, opt.ema)
    train_model, graphed = AuxForward(model), False
    if args.cuda_graph_train is not False:  # None (the default): wherever it can run, quietly on a CPU
        from dyvm.train_graph import GraphedTrainStep, distributed_for_graphs, graph_step_problem
        problem = graph_step_problem(s.device, opt.optimizer, opt.scaler)
        if problem and (args.cuda_graph_train or s.device.type == "cuda"):
            s.print(f"note: {problem}; training steps run eagerly")
        graphed = problem is None
    s.print(f"training steps: {'CUDA-graph replays' if graphed else 'eager'}")
    ddp_kwargs = dict(find_unused_parameters=True)  # e.g. predictors of a stage no sample reached
    stream = None
    if s.world_size > 1 and graphed:
        train_model, stream = distributed_for_graphs(train_model, s.device, **ddp_kwargs)
    elif s.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[s.device.index] if s.device.type == "cuda" else None, **ddp_kwargs)
    if graphed:
        opt.graph_step = GraphedTrainStep(train_model, opt.criterion, opt.optimizer, s.amp_dtype, args.clip_grad,
                                          stream=stream)
    writer = None
    if args.output_dir and s.rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(args.output_dir, "tensorboard"))
    s.print(f"training epochs {start_epoch}..{opt.num_epochs - 1}, lr {opt.lr:.3g} (global batch "
            f"{args.batch_size * s.world_size}), output {args.output_dir or '(none)'}")
    stats, n_params = {}, sum(p.numel() for p in model.parameters())
    for epoch in range(start_epoch, opt.num_epochs if args.stop_epoch is None else min(opt.num_epochs,
                                                                                       args.stop_epoch)):
        t0 = time.time()
        train_stats, test_stats, ema_stats = run_epoch(s, opt, train_model, epoch, global_step)
        global_step += train_stats["steps"]
        is_best, max_acc = test_stats["acc1"] > max_acc, max(max_acc, test_stats["acc1"])
        if args.output_dir and s.rank == 0:
            state = training_state(model, opt.optimizer, opt.scheduler, opt.scaler, opt.ema, epoch=epoch,
                                   global_step=global_step, max_accuracy=max_acc, args=args,
                                   teacher_path=teacher_path, checkpoint_dir=args.output_dir)
            save_training_checkpoint(state, args.output_dir, is_best)
        stats = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()},
                 **{f"test_{k}": v for k, v in test_stats.items()},
                 **{f"ema_test_{k}": v for k, v in ema_stats.items() if not isinstance(v, list)},
                 "max_accuracy": max_acc, "n_parameters": n_params, "epoch_time_s": round(time.time() - t0, 2)}
        ema_text = f"EMA {ema_stats['acc1']:.2f}, " if ema_stats else ""  # only when it was evaluated
        s.print(f"epoch {epoch}: loss {train_stats['loss']:.4f} ({train_stats['images_per_s']:.0f} images/s), "
                f"val top-1 {test_stats['acc1']:.2f} "
                f"({ema_text}best {max_acc:.2f}), {test_stats['gmacs_paper']:.4f} G paper MACs, "
                f"{stats['epoch_time_s']:.0f} s")
        log_epoch(s, writer, stats)
    if writer is not None:
        writer.close()
    return stats


def run(args) -> dict:
    session = prepare(args)
    return run_evaluation(session) if args.eval else run_training(session)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["seg"]:  # semantic segmentation (dyvm/seg/run.py): its own options
        from dyvm.seg.run import main as seg_main
        return seg_main(argv[1:])
    return run_cli(lambda: run(parse_args(argv)), USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
