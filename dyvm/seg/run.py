"""`python main.py seg ...`: train or evaluate a segmentation model (single process or torchrun).

    torchrun --nproc_per_node=2 main.py seg --config configs/seg/dyvm-vim-t-80k.yaml \
        --data-set ADE20K --data-path /data/ADEChallengeData2016 --model-path vim_t_midclstok_76p1acc.pth \
        --output_dir output/seg-dyvm-t
    python main.py seg --config configs/seg/dyvm-vim-t-80k.yaml --model-path output/seg-dyvm-t/checkpoint.pth \
        --eval --data-set ADE20K --data-path /data/ADEChallengeData2016

Iteration-based: the schedule, checkpoints, logging and evaluation count iterations. Outputs in --output_dir:
args.yaml, checkpoint.pth (atomic; --resume continues exactly), best_checkpoint.pth (best mIoU), log.txt (one JSON
line per log interval and per evaluation), tensorboard events, eval.json (--eval). Options: dyvm.seg.config.
"""
import json
import os
import sys
import time
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader

from dyvm.checkpoint import CheckpointError, save_checkpoint
from dyvm.cli import check_kernel_settings, run_cli
from dyvm.config import apply_tf32, show_progress
from dyvm.data import DataError
from dyvm.engine import init_distributed, seed_everything
from dyvm.report import pruning_lines
from dyvm.seg.checkpoint import load_seg_checkpoint
from dyvm.seg.config import DYVM_OPTIONS, ConfigError, parse_args, save_args
from dyvm.seg.data import (EpochSampler, EvalTransform, TrainTransform, Transformed, build_seg_splits, collate_eval,
                           collate_train)
from dyvm.seg.engine import NonFiniteLossError, evaluate, train_step, unwrap
from dyvm.seg.flops import nominal_backbone_macs
from dyvm.seg.losses import SegLoss
from dyvm.seg.optim import PolySchedule, build_optimizer
from dyvm.seg.segmentor import build_segmentor, dense_twin, to_sync_batchnorm


class SegOptionError(ValueError):
    """Options that do not make a segmentation model."""


def print0(rank: int, *msg):
    if rank == 0:
        print(*msg, flush=True)


def build_model(args, num_classes: int):
    options = {k: getattr(args, k) for k in DYVM_OPTIONS if getattr(args, k) is not None}
    if args.token_keep_ratios is not None:
        options.pop("token_keep_ratio", None)
    try:  # (defaults of the DyVM options: the registry's token keep, the segmentation block keep target 0.8)
        return build_segmentor(
            args.model, num_classes=num_classes, img_size=args.crop_size, patch_size=args.patch_size,
            depth=args.depth, embed_dim=args.embed_dim, d_state=args.d_state, drop_path_rate=args.drop_path,
            out_indices=args.out_indices, decode_channels=args.decode_channels, aux_channels=args.aux_channels,
            aux_head=args.aux_weight > 0, pruning_loc=args.pruning_loc, feature_source=args.feature_source,
            **options)
    except (TypeError, ValueError) as e:
        raise SegOptionError(f"cannot build {args.model}: {e}") from None


def build_loaders(args, splits, world_size: int, rank: int, start_iter: int):
    """Endless training loader starting after `start_iter` iterations, and the validation loader (this rank's
    share of the images)."""
    common = dict(num_workers=args.num_workers, pin_memory=args.pin_mem)
    train_tf = TrainTransform(splits.base_scale, args.crop_size, args.ratio_range, args.cat_max_ratio, args.hflip,
                              args.photometric)
    train = Transformed(splits.train, train_tf, args.seed)
    sampler = EpochSampler(len(train), args.seed, rank, world_size, start=start_iter * args.batch_size)
    train_loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                              collate_fn=collate_train, **common)
    val = Transformed(splits.val, EvalTransform(splits.base_scale), args.seed)
    n_val = len(val) if args.max_val_images is None else min(args.max_val_images, len(val))
    val_loader = DataLoader(val, batch_size=args.eval_batch_size, sampler=list(range(rank, n_val, world_size)),
                            collate_fn=collate_eval, **common)
    return train_loader, val_loader


def run_eval(args, model, val_loader, device, amp_dtype, rank: int) -> dict:
    from dyvm.benchmark import measure_interleaved, paired_speedup
    base = unwrap(model)
    stride = args.slide_stride or args.crop_size * 2 // 3
    res = {"model": args.model, "parameters": sum(p.numel() for p in base.parameters()),
           "backbone_parameters": sum(p.numel() for p in base.backbone.parameters()),
           "crop_size": args.crop_size, "slide_stride": stride, "num_patches": base.backbone.cfg.num_patches}
    res["val"] = evaluate(model, val_loader, device, crop_size=args.crop_size, stride=stride, amp_dtype=amp_dtype,
                          progress=show_progress(args.progress))
    dense = dense_twin(base) if base.backbone.is_dynamic else base
    paper, full = nominal_backbone_macs(dense.backbone)
    res["dense"] = {"gmacs_backbone_paper": paper / 1e9, "gmacs_backbone_full": full / 1e9,
                    "gmacs_decode": res["val"]["gmacs_decode"]}
    if args.throughput and rank == 0:
        kw = dict(batch_size=args.throughput_batch_size, img_size=args.crop_size, in_chans=3, device=device,
                  dtype=amp_dtype, warmup=max(2, args.throughput_iters // 3), iters=args.throughput_iters)
        timed = {"model": base, "backbone": base.backbone}
        if dense is not base:  # the dense twin, interleaved with the model (measure_interleaved)
            timed.update(dense_model=dense, dense_backbone=dense.backbone)
        got = measure_interleaved(timed, **kw)
        res["throughput"] = {k: v["images_per_s"] for k, v in got.items()}
        if dense is not base:  # round by round, as they were timed
            res["throughput"].update(speedup_model=paired_speedup(got["model"], got["dense_model"]),
                                     speedup_backbone=paired_speedup(got["backbone"], got["dense_backbone"]))
        res["throughput"].update(batch_size=kw["batch_size"], iters=kw["iters"], device=str(device),
                                 dtype=str(amp_dtype or "float32"))
    return res


def summarize_eval(res: dict) -> str:
    v, d = res["val"], res["dense"]
    lines = [f"{res['model']}: {res['parameters']:,} parameters ({res['backbone_parameters']:,} backbone), "
             f"{v['num_images']} images, slide {res['crop_size']}/{res['slide_stride']} "
             f"({v['windows_per_image']} windows per image)",
             f"  mIoU {v['mIoU']:.2f}  mAcc {v['mAcc']:.2f}  aAcc {v['aAcc']:.2f}",
             f"  MACs per {res['crop_size']}x{res['crop_size']} window: backbone {v['gmacs_backbone_paper']:.4f} G "
             f"paper (one scan direction) / {v['gmacs_backbone_full']:.4f} G full (both); neck + decode head "
             f"{v['gmacs_decode']:.4f} G; total {v['gmacs_paper']:.4f} / {v['gmacs_full']:.4f} G",
             f"  dense backbone: {d['gmacs_backbone_paper']:.4f} G paper / {d['gmacs_backbone_full']:.4f} G full"]
    lines += pruning_lines(v, res["num_patches"])
    t = res.get("throughput")
    if t:
        text = f"  images/s ({t['device']}, {t['dtype']}, batch {t['batch_size']}): model {t['model']:.1f}, " \
               f"backbone {t['backbone']:.1f}"
        if "dense_model" in t:
            text += (f"; dense twin: model {t['dense_model']:.1f} (x{t['speedup_model']:.2f}), "
                     f"backbone {t['dense_backbone']:.1f} (x{t['speedup_backbone']:.2f}; timed in turns)")
        lines.append(text)
    return "\n".join(lines)


def _state(args, model, optimizer, scaler, it: int, best: float) -> dict:
    return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler else None, "iteration": it, "best_miou": best, "args": vars(args)}


def _log(args, writer, rank: int, record: dict):
    if rank != 0 or not args.output_dir:
        return
    with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "iter":
                writer.add_scalar(k, v, record["iter"])
        writer.flush()


def train(args, model, splits, device, world_size: int, rank: int, resumed, amp_dtype):
    start = resumed["iteration"] if resumed is not None else 0
    train_loader, val_loader = build_loaders(args, splits, world_size, rank, start)
    loss_fn = SegLoss.from_model(model, aux_weight=args.aux_weight, token_weight=args.token_pruning_weight,
                                 block_weight=args.block_pruning_weight)
    optimizer = build_optimizer(model, args.lr, args.weight_decay, args.layer_decay, args.opt_betas)
    schedule = PolySchedule(optimizer, args.max_iters, args.poly_power, args.warmup_iters, args.warmup_ratio,
                            args.min_lr)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    best = -1.0
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        if scaler is not None and resumed.get("scaler"):
            scaler.load_state_dict(resumed["scaler"])
        best = resumed.get("best_miou", -1.0)
    train_model = model
    if world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            to_sync_batchnorm(model, device), device_ids=[device.index] if device.type == "cuda" else None)
    writer = None
    if args.output_dir and rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(args.output_dir, "tensorboard"))
    stop = args.stop_iter or args.max_iters
    print0(rank, f"training iterations {start}..{stop - 1} of {args.max_iters}, {args.batch_size} images per "
                 f"process x {world_size}, lr {args.lr:g}, output {args.output_dir or '(none)'}")
    meter, n, t0 = defaultdict(float), 0, time.time()
    batches = iter(train_loader)
    it = start
    record = {}
    while it < stop:
        images, masks = next(batches)
        torch.manual_seed(args.seed * 1_000_003 + it * 1009 + rank)  # Gumbel noise, drop path, dropout
        lr = schedule.step(it)
        stats = train_step(train_model, loss_fn, images.to(device, non_blocking=True),
                           masks.to(device, non_blocking=True), optimizer, clip_grad=args.clip_grad,
                           amp_dtype=amp_dtype, scaler=scaler, it=it)
        it += 1
        for k, v in stats.items():
            meter[k] += v
        n += 1
        if it % args.log_interval == 0 or it == stop:
            if world_size > 1:  # the mean over every process's steps
                total = torch.tensor(list(meter.values()), dtype=torch.float64, device=device)
                dist.all_reduce(total)
                meter = dict(zip(meter, (total / world_size).tolist()))
            record = {"iter": it, "lr": lr, **{f"train_{k}": v / n for k, v in meter.items()},
                      "seconds_per_iter": round((time.time() - t0) / n, 4)}
            _log(args, writer, rank, record)
            print0(rank, f"iter {it}/{args.max_iters}: loss {record['train_loss']:.4f}, lr {lr:.3g}, "
                         f"{record['seconds_per_iter']:.3f} s/iter")
            meter, n, t0 = defaultdict(float), 0, time.time()
        evaluate_now = it == stop or (args.eval_interval and it % args.eval_interval == 0)
        is_best = False
        if evaluate_now:
            res = evaluate(train_model, val_loader, device, crop_size=args.crop_size,
                           stride=args.slide_stride or args.crop_size * 2 // 3, amp_dtype=amp_dtype,
                           progress=show_progress(args.progress), desc=f"iter {it} eval")
            is_best, best = res["mIoU"] > best, max(best, res["mIoU"])
            scalars = {f"val_{k}": v for k, v in res.items() if k not in ("IoU", "Acc")}  # per-class: eval.json
            _log(args, writer, rank, {"iter": it, **scalars, "best_miou": best})
            print0(rank, f"iter {it}: val mIoU {res['mIoU']:.2f} (best {best:.2f}), mAcc {res['mAcc']:.2f}, "
                         f"aAcc {res['aAcc']:.2f}, {res['gmacs_backbone_paper']:.4f} G backbone MACs (paper)")
            record = {**record, **scalars}
        if args.output_dir and rank == 0 and (it % args.save_interval == 0 or it == stop or is_best):
            state = _state(args, model, optimizer, scaler, it, best)
            if it % args.save_interval == 0 or it == stop:
                save_checkpoint(state, os.path.join(args.output_dir, "checkpoint.pth"))
            if is_best:
                save_checkpoint(state, os.path.join(args.output_dir, "best_checkpoint.pth"))
    if writer is not None:
        writer.close()
    return record


def run(args) -> dict:
    check_kernel_settings()
    world_size, rank, device = init_distributed(args)
    seed_everything(args.seed)  # the same on every rank: identical fresh weights
    if args.output_dir and rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        save_args(args, args.output_dir)
    splits = build_seg_splits(args)
    num_classes = args.nb_classes or splits.num_classes
    if num_classes < splits.num_classes:
        raise ConfigError(f"--nb-classes {num_classes} is smaller than the {splits.num_classes} classes of the data")
    print0(rank, f"data: {args.data_set}, {len(splits.train)} train / {len(splits.val)} val images, {num_classes} "
                 f"classes; {world_size} process(es) on {device}")
    model = build_model(args, num_classes)
    resumed = None
    if args.resume:
        resumed = torch.load(args.resume, map_location="cpu", weights_only=False)
        if not isinstance(resumed, dict) or "iteration" not in resumed or "model" not in resumed:
            raise CheckpointError(f"--resume {args.resume} is not a training checkpoint of `main.py seg` (needs "
                                  "'model' and 'iteration'); to start from weights use --model-path")
        try:
            model.load_state_dict(resumed["model"])
        except RuntimeError as e:
            raise CheckpointError(f"--resume {args.resume} does not fit the model: {str(e).splitlines()[0]}") from None
        print0(rank, f"resuming from {args.resume} (iteration {resumed['iteration']})")
    elif args.model_path:
        print0(rank, f"model: {args.model_path}: {load_seg_checkpoint(model, args.model_path)}")
    model.to(device)
    print0(rank, f"model: {args.model}, {sum(p.numel() for p in model.parameters()):,} parameters")
    amp_dtype = getattr(torch, args.amp_dtype) if args.amp else None
    apply_tf32(args, device, lambda *m: print0(rank, *m))
    if args.eval:
        _, val_loader = build_loaders(args, splits, world_size, rank, 0)
        res = run_eval(args, model, val_loader, device, amp_dtype, rank)
        print0(rank, summarize_eval(res))
        if args.output_dir and rank == 0:
            with open(os.path.join(args.output_dir, "eval.json"), "w") as f:
                json.dump(res, f, indent=1)
        return res
    return train(args, model, splits, device, world_size, rank, resumed, amp_dtype)


def main(argv=None) -> int:
    return run_cli(lambda: run(parse_args(argv)),
                   (ConfigError, SegOptionError, DataError, CheckpointError, NonFiniteLossError))


if __name__ == "__main__":
    sys.exit(main())
