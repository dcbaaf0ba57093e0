"""Command line of main.py: the authors' flags (reference-implementation.md section 3) grouped by concern,
YAML configs read into argparse defaults (timm train.py style), validation with one-line errors, args.yaml.

Precedence: built-in defaults < --config YAML < flags given on the command line.
Every flag here does something; the reference's dead flags (distillation-*, layer-*, finetune, ...) do not exist.
"""
import argparse
import os
import sys
from typing import Optional, Sequence

import yaml

from dyvm.cli import ArgumentParser, flag_name
from dyvm.models.registry import (DEFAULT_BLOCK_KEEP_RATIO, DEFAULT_TOKEN_KEEP_RATIO, ModelOptionError,
                                  check_keep_ratios, describe_names)


class ConfigError(ValueError):
    """A bad option value; the message names the option and says what is wrong."""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser("python main.py", description="DyVM training and evaluation (single process or torchrun)")
    p.add_argument("--config", default="", help="YAML file of defaults (keys = flag names with _); "
                   "flags given on the command line win")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="Vim-Tiny",
                   help=f"{describe_names()}. The authors' names (Vim-Small) and dyvm_* build a DyVM student "
                        "distilled from its dense teacher; vim_* a plain dense model trained with the "
                        "classification loss")
    g.add_argument("--model-path", default="", help="checkpoint that initialises the model (official Vim or DyVM)")
    g.add_argument("--input-size", type=int, default=224)
    g.add_argument("--patch-size", type=int, default=None, help="override (small models only; default 16)")
    g.add_argument("--depth", type=int, default=None, help="override (small models only; default 24)")
    g.add_argument("--embed-dim", type=int, default=None, help="override (small models only)")
    g.add_argument("--d-state", type=int, default=None, help="override (small models only; default 16)")
    g.add_argument("--in-chans", type=int, default=3)
    g.add_argument("--nb-classes", type=int, default=None, help="default: from the data set")
    g.add_argument("--drop", type=float, default=0.0, help="dropout after the position embedding")
    g.add_argument("--drop-path", type=float, default=0.1)

    g = p.add_argument_group("DyVM")
    g.add_argument("--token-keep-ratio", type=float, default=DEFAULT_TOKEN_KEEP_RATIO,
                   help="r in (0, 1]: stages keep r, r^2, r^3 of the patches")
    g.add_argument("--token-keep-ratios", type=float, nargs=3, default=None, help="explicit cumulative ratios")
    g.add_argument("--block-keep-ratio", type=float, default=DEFAULT_BLOCK_KEEP_RATIO,
                   help="in [0, 1]: the target fraction of scan directions run (the mean of the gates)")
    g.add_argument("--pruning-loc", type=int, nargs="+", default=None, help="layers before which tokens are "
                   "pruned (default 6 12 18, or spread evenly over a smaller --depth)")
    g.add_argument("--pruning", default="learned", choices=("learned", "random", "static", "none"))
    g.add_argument("--block-selection", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--predictor-input", default="residual", choices=("residual", "ssm_B", "ssm_delta"))
    g.add_argument("--token-pruning-weight", type=float, default=16.0)
    g.add_argument("--block-pruning-weight", type=float, default=16.0)
    g.add_argument("--clf-weight", type=float, default=1.0)
    g.add_argument("--distill-weight", type=float, default=0.5, help="weight of KL + token-feature MSE")
    g.add_argument("--token-distill", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--teacher-path", default="", help="dense teacher checkpoint (default: --model-path); "
                   "stored in checkpoints so --resume and --eval use the same teacher")
    g.add_argument("--teacher", action=argparse.BooleanOptionalAction, default=True,
                   help="distil from the frozen dense teacher (--no-teacher: no KL / token MSE)")
    g.add_argument("--gumbel-noise", action=argparse.BooleanOptionalAction, default=True)

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=64, help="per process")
    g.add_argument("--eval-batch-size", type=int, default=None, help="default 1.5 x --batch-size")
    g.add_argument("--epochs", type=int, default=30)
    g.add_argument("--opt", default="adamw", help="any timm optimizer name")
    g.add_argument("--opt-eps", type=float, default=1e-8)
    g.add_argument("--opt-betas", type=float, nargs="+", default=None)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--clip-grad", type=float, default=None, help="max gradient norm")
    g.add_argument("--lr", type=float, default=5e-4, help="for a global batch of 512 (see --unscale-lr)")
    g.add_argument("--unscale-lr", action="store_true", help="use --lr as given, not lr * global batch / 512")
    g.add_argument("--sched", default="cosine", help="any timm scheduler name")
    g.add_argument("--sched-on-updates", action="store_true", help="step the schedule (and warm-up) every update, "
                   "not every epoch (short runs such as the demo)")
    g.add_argument("--warmup-lr", type=float, default=1e-5)
    g.add_argument("--min-lr", type=float, default=1e-5)
    g.add_argument("--warmup-epochs", type=int, default=5)
    g.add_argument("--cooldown-epochs", type=int, default=0)
    g.add_argument("--decay-epochs", type=float, default=30)
    g.add_argument("--decay-rate", "--dr", type=float, default=0.1)
    g.add_argument("--patience-epochs", type=int, default=10)
    g.add_argument("--lr-noise", type=float, nargs="+", default=None)
    g.add_argument("--lr-noise-pct", type=float, default=0.67)
    g.add_argument("--lr-noise-std", type=float, default=1.0)
    g.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--model-ema-decay", type=float, default=0.99996)
    g.add_argument("--model-ema-force-cpu", action="store_true")
    g.add_argument("--eval-ema-each-epoch", action=argparse.BooleanOptionalAction, default=True,
                   help="also evaluate the EMA after every epoch (--eval always reports it)")
    g.add_argument("--amp", action="store_true", help="autocast (bf16 by default); fp32 is the default")
    g.add_argument("--no_amp", dest="amp", action="store_false", help="fp32 (the default; the scripts pass it)")
    g.add_argument("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16"))

    g = p.add_argument_group("augmentation")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="timm auto-augment policy; 'none' to disable")
    g.add_argument("--color-jitter", type=float, default=0.3)
    g.add_argument("--train-interpolation", default="bicubic")
    g.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0), help="random-resized-crop area range")
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--reprob", type=float, default=0.25)
    g.add_argument("--remode", default="pixel")
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--mixup", type=float, default=0.8)
    g.add_argument("--cutmix", type=float, default=1.0)
    g.add_argument("--cutmix-minmax", type=float, nargs=2, default=None)
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", default="batch", choices=("batch", "pair", "elem"))
    g.add_argument("--smoothing", type=float, default=0.1)
    g.add_argument("--bce-loss", action="store_true", help="binary cross-entropy on the soft targets")
    g.add_argument("--repeated-aug", action=argparse.BooleanOptionalAction, default=True,
                   help="3-repeat augmentation sampler under DDP")
    g.add_argument("--eval-crop-ratio", type=float, default=0.875)

    g = p.add_argument_group("data")
    g.add_argument("--data-set", default="IMNET", choices=("IMNET", "IMAGEFOLDER", "EMBEDDED", "SYNTHETIC"))
    g.add_argument("--data-path", default="")
    g.add_argument("--val-fraction", type=float, default=0.15, help="EMBEDDED / IMAGEFOLDER without val/")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the train/val split")
    g.add_argument("--synthetic-size", type=int, default=256)
    g.add_argument("--num_workers", type=int, default=10)
    g.add_argument("--pin-mem", action=argparse.BooleanOptionalAction, default=False)

    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default="")
    g.add_argument("--device", default="", help="default: cuda if available, else cpu")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume", default="", help="checkpoint.pth to continue from exactly")
    g.add_argument("--start_epoch", type=int, default=0)
    g.add_argument("--eval", action="store_true", help="evaluate only: accuracy, tokens, gates, FLOPs, images/s")
    g.add_argument("--dist-eval", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=True,
                   help="measure images/s of the model and its teacher in --eval")
    g.add_argument("--throughput-cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="on a GPU, also time CUDA-graph replays of the forward (GPU throughput without the Python "
                   "launch overhead that bounds eager small models and bf16)")
    g.add_argument("--throughput-batch-size", type=int, default=128)
    g.add_argument("--throughput-iters", type=int, default=30)
    g.add_argument("--stop-epoch", type=int, default=None, help="stop after this many epochs although the schedule "
                   "spans --epochs (time-limited jobs); --resume checkpoint.pth continues exactly")
    g.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap training steps per epoch (tests)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    g.add_argument("--local-rank", "--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    return p


def _yaml_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path} does not exist")
    with open(path) as f:
        try:
            cfg = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"--config {path} must be a mapping of option: value")
    known = {a.dest for a in parser._actions}
    cfg = {k.replace("-", "_"): v for k, v in cfg.items()}
    unknown = sorted(set(cfg) - known - {"config"})
    if unknown:
        raise ConfigError(f"--config {path}: unknown option(s) {unknown}")
    return cfg


def validate(args) -> None:
    """One-line errors for values that would otherwise fail deep inside training."""
    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)
    try:  # the one keep-ratio rule of every entry point
        check_keep_ratios(args.token_keep_ratio, args.token_keep_ratios, args.block_keep_ratio, spell=flag_name)
    except ModelOptionError as e:
        raise ConfigError(str(e)) from None
    need(args.batch_size > 0, f"--batch-size must be positive, got {args.batch_size}")
    need(args.epochs >= 0, f"--epochs must be >= 0, got {args.epochs}")
    need(args.lr > 0, f"--lr must be positive, got {args.lr}")
    need(0 <= args.drop_path < 1, f"--drop-path must be in [0, 1), got {args.drop_path}")
    need(0 < args.val_fraction < 1, f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    need(0 <= args.model_ema_decay < 1, f"--model-ema-decay must be in [0, 1), got {args.model_ema_decay}")
    need(args.input_size > 0, f"--input-size must be positive, got {args.input_size}")
    for name in ("token_pruning_weight", "block_pruning_weight", "distill_weight", "clf_weight"):
        need(getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("model_path", "teacher_path", "resume"):
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


def save_args(args, output_dir: str) -> str:
    """args.yaml in the output folder: every option as used (re-usable as --config)."""
    path = os.path.join(output_dir, "args.yaml")
    values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(vars(args).items())
              if k not in ("local_rank", "config")}
    with open(path, "w") as f:
        yaml.safe_dump(values, f, sort_keys=True)
    return path
