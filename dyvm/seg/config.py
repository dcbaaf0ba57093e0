"""Command line of `python main.py seg`: options grouped by concern, YAML configs as defaults (the same rule as
dyvm.config: built-in defaults < --config YAML < flags on the command line), one-line errors.

The defaults are the authors' ADE20K recipe for the tiny model (UperNet, 512x512 crops, AdamW lr 6e-5, weight
decay 0.01, layer decay 0.92, poly schedule with 1500 linear warm-up iterations, gradient clipping at 5,
8 images per GPU); configs/seg/*.yaml hold each table row and the CPU demo.
"""
import argparse
import os
import sys
from typing import Optional, Sequence

from dyvm.config import ConfigError, _yaml_defaults, add_progress_flag, add_tf32_flag
from dyvm.config import save_args  # noqa: F401  (re-exported for run.py)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("python main.py seg", description="semantic segmentation with a Vim or DyVM "
                                "backbone (UperNet): training, --eval", allow_abbrev=False)
    p.add_argument("--config", default="", help="YAML file of defaults (keys = flag names with _)")
    _model_flags(p)
    _dyvm_flags(p)
    _optimisation_flags(p)
    _data_flags(p)
    _evaluation_flags(p)
    _run_flags(p)
    return p


def _model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="vim_tiny", help="vim_tiny/small/base (dense backbone) or dyvm_vim_* / "
                   "Vim-Tiny/-Small/-Base (DyVM backbone)")
    g.add_argument("--model-path", default="", help="initial weights: a classification checkpoint (Vim or DyVM: "
                   "backbone only) or a segmentation checkpoint (whole model)")
    g.add_argument("--crop-size", type=int, default=512, help="the model's input size (training crops and "
                   "sliding windows)")
    g.add_argument("--patch-size", type=int, default=None, help="override (small models; default 16)")
    g.add_argument("--depth", type=int, default=None, help="override (small models; default 24)")
    g.add_argument("--embed-dim", type=int, default=None, help="override (small models)")
    g.add_argument("--d-state", type=int, default=None, help="override (small models; default 16)")
    g.add_argument("--nb-classes", type=int, default=None, help="default: from the data set")
    g.add_argument("--drop-path", type=float, default=0.1)
    g.add_argument("--out-indices", type=int, nargs=4, default=None, help="layers whose outputs feed the neck "
                   "(default: the last layer of each quarter, 5 11 17 23 at depth 24)")
    g.add_argument("--feature-source", default="mixer", choices=("mixer", "stream"), help="what a layer gives the "
                   "neck: its mixer output (the authors') or the residual stream after it")
    g.add_argument("--decode-channels", type=int, default=None, help="UPerHead width (default: the embed dim)")
    g.add_argument("--aux-channels", type=int, default=256, help="FCN auxiliary head width")
    g.add_argument("--aux-weight", type=float, default=0.4, help="auxiliary loss weight (0: no auxiliary head)")


def _dyvm_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DyVM")
    g.add_argument("--token-keep-ratio", type=float, default=None, help="r: stages keep r, r^2, r^3 of the "
                   "patches (default 0.7)")
    g.add_argument("--token-keep-ratios", type=float, nargs="+", default=None, help="explicit cumulative ratios")
    g.add_argument("--pruning-loc", type=int, nargs="+", default=None, help="layers before which tokens are "
                   "pruned (default: after the first three out indices, 6 12 18 at depth 24)")
    g.add_argument("--pruning", default=None, choices=("learned", "random", "static", "none"))
    g.add_argument("--block-selection", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--block-keep-ratio", type=float, default=None, help="target fraction of scan directions run "
                   "(default 0.8)")
    g.add_argument("--gumbel-noise", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--token-pruning-weight", type=float, default=20.0)
    g.add_argument("--block-pruning-weight", type=float, default=20.0)


def _optimisation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=8, help="per process")
    g.add_argument("--max-iters", type=int, default=80000, help="length of the schedule in iterations")
    g.add_argument("--stop-iter", type=int, default=None, help="stop at this iteration although the schedule is "
                   "longer (time-limited jobs); --resume continues exactly")
    g.add_argument("--lr", type=float, default=6e-5, help="AdamW learning rate of the heads (not scaled by batch)")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--opt-betas", type=float, nargs=2, default=(0.9, 0.999))
    g.add_argument("--layer-decay", type=float, default=0.92, help="lr x decay^(depth + 1 - layer id): layer i "
                   "has id i + 1, embeddings 0, neck/heads/predictors depth + 1")
    g.add_argument("--warmup-iters", type=int, default=1500)
    g.add_argument("--warmup-ratio", type=float, default=1e-6, help="lr factor at the first warm-up iteration")
    g.add_argument("--poly-power", type=float, default=1.0)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--clip-grad", type=float, default=5.0, help="max gradient norm (0: no clipping)")
    g.add_argument("--amp", action="store_true", help="autocast (bf16 by default); fp32 is the default")
    g.add_argument("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16"))
    add_tf32_flag(g)


def _data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-set", default="SCENES", choices=("SCENES", "ADE20K", "FOLDER"))
    g.add_argument("--data-path", default="")
    g.add_argument("--img-scale", type=int, nargs=2, default=None, help="base scale (long short) images are "
                   "resized to, keeping their aspect ratio (default 2048 512; SCENES: the scene size)")
    g.add_argument("--ratio-range", type=float, nargs=2, default=(0.5, 2.0), help="training resize ratio range")
    g.add_argument("--cat-max-ratio", type=float, default=0.75, help="a training crop is retried while one class "
                   "covers more than this fraction of it (1: off)")
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--photometric", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--scene-size", type=int, default=64, help="SCENES: side of a scene in pixels")
    g.add_argument("--animals-per-scene", type=int, nargs=2, default=(2, 4), help="SCENES: min max")
    g.add_argument("--animal-scale", type=float, nargs=2, default=(0.35, 0.6), help="SCENES: animal side as a "
                   "fraction of the scene side, min max")
    g.add_argument("--scene-classes", nargs="+", default=None, help="SCENES: only these animals (default all "
                   "ten: bear bird cat cow dog elephant giraffe horse sheep zebra)")
    g.add_argument("--train-scenes", type=int, default=100000, help="SCENES: scenes per training epoch")
    g.add_argument("--val-scenes", type=int, default=500, help="SCENES: validation scenes")
    g.add_argument("--val-fraction", type=float, default=0.15, help="SCENES: silhouettes kept for validation")
    g.add_argument("--data-seed", type=int, default=0)
    g.add_argument("--num_workers", type=int, default=4)
    g.add_argument("--pin-mem", action=argparse.BooleanOptionalAction, default=False)


def _evaluation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", action="store_true", help="evaluate only: mIoU/mAcc/aAcc, tokens, gates, MACs, "
                   "images/s against the dense backbone")
    g.add_argument("--slide-stride", type=int, default=None, help="sliding-window stride (default 2/3 of the "
                   "crop: 341 at 512)")
    g.add_argument("--eval-interval", type=int, default=8000, help="evaluate every this many iterations "
                   "(0: only at the end)")
    g.add_argument("--eval-batch-size", type=int, default=1, help="validation images per step (same-size "
                   "images are stacked; windows of a batch run together)")
    g.add_argument("--max-val-images", type=int, default=None, help="evaluate on the first N images only")
    g.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=True,
                   help="--eval: time images/s of the model and of its dense twin in this run")
    g.add_argument("--throughput-batch-size", type=int, default=16)
    g.add_argument("--throughput-iters", type=int, default=20)


def _run_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default="")
    g.add_argument("--device", default="", help="default: cuda if available, else cpu")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume", default="", help="checkpoint.pth of this command to continue exactly")
    g.add_argument("--save-interval", type=int, default=8000, help="write checkpoint.pth every this many "
                   "iterations (and at the end)")
    g.add_argument("--log-interval", type=int, default=50)
    add_progress_flag(g)
    g.add_argument("--local-rank", "--local_rank", type=int, default=0, help=argparse.SUPPRESS)


DYVM_OPTIONS = ("token_keep_ratio", "token_keep_ratios", "pruning", "block_selection", "block_keep_ratio",
                "gumbel_noise")


def validate(args) -> None:
    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)
    positive = ("batch_size", "eval_batch_size", "max_iters", "crop_size", "log_interval", "throughput_batch_size",
                "scene_size", "train_scenes", "val_scenes")
    for name in positive:
        need(getattr(args, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    need(args.lr > 0, f"--lr must be positive, got {args.lr}")
    need(0 < args.layer_decay <= 1, f"--layer-decay must be in (0, 1], got {args.layer_decay}")
    need(0 <= args.drop_path < 1, f"--drop-path must be in [0, 1), got {args.drop_path}")
    need(args.warmup_iters >= 0 and 0 < args.warmup_ratio <= 1, "--warmup-iters must be >= 0 and --warmup-ratio "
         f"in (0, 1], got {args.warmup_iters} / {args.warmup_ratio}")
    need(0 < args.ratio_range[0] <= args.ratio_range[1], f"--ratio-range must be 0 < min <= max, got "
         f"{list(args.ratio_range)}")
    need(0 < args.val_fraction < 1, f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    need(args.animals_per_scene[0] >= 1 and args.animals_per_scene[0] <= args.animals_per_scene[1],
         f"--animals-per-scene must be 1 <= min <= max, got {list(args.animals_per_scene)}")
    need(0 < args.animal_scale[0] <= args.animal_scale[1] <= 1, f"--animal-scale must be 0 < min <= max <= 1, "
         f"got {list(args.animal_scale)}")
    stride = args.slide_stride
    need(stride is None or 0 < stride <= args.crop_size, f"--slide-stride must be in [1, --crop-size "
         f"{args.crop_size}], got {stride}")
    for name in ("aux_weight", "token_pruning_weight", "block_pruning_weight", "clip_grad", "min_lr"):
        need(getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.stop_iter is not None:
        need(0 < args.stop_iter <= args.max_iters, f"--stop-iter must be in [1, --max-iters {args.max_iters}], "
             f"got {args.stop_iter}")
    for name in ("model_path", "resume"):
        path = getattr(args, name)
        need(not path or os.path.isfile(path), f"--{name.replace('_', '-')} {path} does not exist")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_yaml_defaults(parser, pre.config))
    args = parser.parse_args(argv)
    validate(args)
    return args
