"""Command line of main.py: the authors' flags grouped by concern, YAML configs read into argparse defaults
(timm train.py style; a config may inherit another with `base:`), validation with one-line errors, args.yaml.

Precedence: built-in defaults < the options saved in a --resume checkpoint < --config YAML < flags given on
the command line. Every flag here does something; the authors' dead flags (distillation-*, layer-*, finetune,
...) do not exist (docs/differences.md).
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
    p = ArgumentParser("python main.py", description="DyVM training and evaluation (single process or torchrun). "
                       "Precedence: defaults < --resume's saved options < --config < flags on the command line.")
    p.add_argument("--config", default="", help="YAML file of defaults (keys = flag names with _; 'base: FILE' "
                   "inherits another config); flags given on the command line win")
    for add_group in (_model_flags, _dyvm_flags, _optimisation_flags, _augmentation_flags, _data_flags, _run_flags):
        add_group(p)
    return p


def _model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="Vim-Tiny",
                   help=f"{describe_names()}. The authors' names (Vim-Small) and dyvm_* build a DyVM student "
                        "distilled from its dense teacher; vim_* a plain dense model trained with the "
                        "classification loss")
    g.add_argument("--model-path", default="", help="checkpoint that initialises the model (official Vim or DyVM)")
    g.add_argument("--input-size", type=int, default=224, help="image side in pixels")
    g.add_argument("--patch-size", type=int, default=None, help="override (small models only; default 16)")
    g.add_argument("--depth", type=int, default=None, help="override (small models only; default 24)")
    g.add_argument("--embed-dim", type=int, default=None, help="override (small models only)")
    g.add_argument("--d-state", type=int, default=None, help="override (small models only; default 16)")
    g.add_argument("--in-chans", type=int, default=3, help="input channels")
    g.add_argument("--nb-classes", type=int, default=None, help="classes of the head (default: from the data set)")
    g.add_argument("--drop", type=float, default=0.0, help="dropout after the position embedding")
    g.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate of the last layer")


def _dyvm_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DyVM")
    g.add_argument("--token-keep-ratio", type=float, default=DEFAULT_TOKEN_KEEP_RATIO,
                   help="r in (0, 1]: stages keep r, r^2, r^3 of the patches")
    g.add_argument("--token-keep-ratios", type=float, nargs=3, default=None,
                   help="explicit cumulative ratios per stage, non-increasing in (0, 1] (instead of r)")
    g.add_argument("--block-keep-ratio", type=float, default=DEFAULT_BLOCK_KEEP_RATIO,
                   help="in [0, 1]: the target fraction of scan directions run (the mean of the gates)")
    g.add_argument("--pruning-loc", type=int, nargs="+", default=None, help="layers before which tokens are "
                   "pruned (default 6 12 18, or the same quarters of a smaller --depth)")
    g.add_argument("--pruning", default="learned", choices=("learned", "random", "static", "none"),
                   help="token selection: the learned predictor, random or evenly spaced (ablations), or none")
    g.add_argument("--block-selection", action=argparse.BooleanOptionalAction, default=True,
                   help="per-image gates on the two scan directions of every layer")
    g.add_argument("--predictor-input", default="residual", choices=("residual", "ssm_B", "ssm_delta"),
                   help="what the token predictor reads: the residual stream, or the previous layer's SSM B "
                        "or raw delta (ablation)")
    g.add_argument("--token-pruning-weight", type=float, default=16.0, help="weight of the token-ratio loss")
    g.add_argument("--block-pruning-weight", type=float, default=16.0, help="weight of the block-ratio loss")
    g.add_argument("--clf-weight", type=float, default=1.0, help="weight of the classification loss")
    g.add_argument("--distill-weight", type=float, default=0.5, help="weight of KL + token-feature MSE")
    g.add_argument("--token-distill", action=argparse.BooleanOptionalAction, default=True,
                   help="distil the kept patch tokens from the teacher's (MSE) as well as the logits")
    g.add_argument("--teacher-path", default="", help="dense teacher checkpoint (default: --model-path); "
                   "stored in checkpoints so --resume and --eval use the same teacher")
    g.add_argument("--teacher", action=argparse.BooleanOptionalAction, default=True,
                   help="distil from the frozen dense teacher (--no-teacher: no KL / token MSE)")
    g.add_argument("--teacher-dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="precision of the frozen teacher's forward: auto follows the training's autocast; "
                        "bfloat16 makes fp32 fine-tuning's teacher about 2.5x cheaper (its targets then carry "
                        "bf16 rounding)")
    g.add_argument("--gumbel-noise", action=argparse.BooleanOptionalAction, default=True,
                   help="Gumbel noise in the training decisions (--no-gumbel-noise: deterministic)")


def _optimisation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=64, help="per process")
    g.add_argument("--eval-batch-size", type=int, default=None, help="default 1.5 x --batch-size")
    g.add_argument("--epochs", type=int, default=30, help="length of the schedule")
    g.add_argument("--opt", default="adamw", help="any timm optimizer name")
    g.add_argument("--opt-eps", type=float, default=1e-8, help="optimizer epsilon")
    g.add_argument("--opt-betas", type=float, nargs="+", default=None, help="optimizer betas (default: timm's)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=0.05, help="weight decay (not on norms, biases, "
                   "position embedding, class token)")
    g.add_argument("--clip-grad", type=float, default=None, help="max gradient norm")
    g.add_argument("--lr", type=float, default=5e-4, help="for a global batch of 512 (see --unscale-lr)")
    g.add_argument("--unscale-lr", action="store_true", help="use --lr as given, not lr * global batch / 512")
    g.add_argument("--sched", default="cosine", help="any timm scheduler name")
    g.add_argument("--sched-on-updates", action="store_true", help="step the schedule (and warm-up) every update, "
                   "not every epoch (short runs such as the demo)")
    g.add_argument("--warmup-lr", type=float, default=1e-5, help="learning rate at the start of the warm-up")
    g.add_argument("--min-lr", type=float, default=1e-5, help="floor of the schedule")
    g.add_argument("--warmup-epochs", type=int, default=5, help="epochs of linear warm-up")
    g.add_argument("--cooldown-epochs", type=int, default=0, help="epochs at --min-lr after the schedule")
    g.add_argument("--decay-epochs", type=float, default=30, help="step schedules: epochs between decays")
    g.add_argument("--decay-rate", "--dr", type=float, default=0.1, help="step schedules: decay factor")
    g.add_argument("--patience-epochs", type=int, default=10, help="plateau schedule: epochs without progress")
    g.add_argument("--lr-noise", type=float, nargs="+", default=None, help="epoch range (fractions) of LR noise")
    g.add_argument("--lr-noise-pct", type=float, default=0.67, help="LR noise limit")
    g.add_argument("--lr-noise-std", type=float, default=1.0, help="LR noise standard deviation")
    g.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=True,
                   help="keep an exponential moving average of the weights")
    g.add_argument("--model-ema-decay", type=float, default=0.99996, help="EMA decay per update")
    g.add_argument("--model-ema-force-cpu", action="store_true", help="keep the EMA on the CPU")
    g.add_argument("--eval-ema-each-epoch", action=argparse.BooleanOptionalAction, default=True,
                   help="also evaluate the EMA after every epoch (--eval always reports it)")
    g.add_argument("--cuda-graph-train", action=argparse.BooleanOptionalAction, default=None,
                   help="replay each training step from a CUDA graph (on each GPU, DDP's all-reduces included; "
                        "Adam/AdamW made fused and capturable; the host's launch work leaves the step; the same "
                        "weights bit for bit: dyvm/train_graph.py). Default: on wherever it can run (a GPU, "
                        "Adam/AdamW, no fp16 GradScaler); --cuda-graph-train says why when it cannot; "
                        "--no-cuda-graph-train: eager steps")
    g.add_argument("--amp", action="store_true", help="autocast (bf16 by default); fp32 is the default")
    g.add_argument("--no_amp", dest="amp", action="store_false", help="fp32 (the default; the scripts pass it)")
    g.add_argument("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16"), help="autocast dtype")
    add_tf32_flag(g)


def add_progress_flag(g) -> None:
    """--progress / --no-progress (classification and segmentation); unset, the runs take show_progress's rule."""
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: when stderr is a terminal, so that logs written to a file hold "
                        "the epoch lines without the bars' carriage-return updates)")


def show_progress(flag: Optional[bool]) -> bool:
    """Whether progress bars show: the --progress flag when given, else whether stderr is a terminal."""
    return sys.stderr.isatty() if flag is None else flag


def add_tf32_flag(g) -> None:
    """--tf32 (classification and segmentation); the run applies it with apply_tf32."""
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=False,
                   help="fp32 matmuls on TF32 tensor cores (CUDA, Ampere and later): faster fp32 training and "
                        "evaluation, with inputs rounded to 10 mantissa bits inside each matmul; off by default, "
                        "as in the authors' fp32 recipe (torch.backends.cuda.matmul.allow_tf32)")


def apply_tf32(args, device, say) -> None:
    """Set torch's process-wide switch for fp32 matmuls from --tf32 (cuDNN's convolutions keep torch's default)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    if args.tf32 and device.type == "cuda":
        say("fp32 matmuls run on TF32 tensor cores (--tf32)")


def _augmentation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("augmentation")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="timm auto-augment policy; 'none' to disable")
    g.add_argument("--color-jitter", type=float, default=0.3, help="colour jitter strength")
    g.add_argument("--train-interpolation", default="bicubic", help="resize interpolation in training")
    g.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0), help="random-resized-crop area range")
    g.add_argument("--hflip", type=float, default=0.5, help="probability of a horizontal flip")
    g.add_argument("--reprob", type=float, default=0.25, help="random-erasing probability")
    g.add_argument("--remode", default="pixel", help="random-erasing mode")
    g.add_argument("--recount", type=int, default=1, help="random-erasing count")
    g.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
    g.add_argument("--cutmix-minmax", type=float, nargs=2, default=None, help="cutmix box ratio range")
    g.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    g.add_argument("--mixup-switch-prob", type=float, default=0.5, help="probability of cutmix instead of mixup")
    g.add_argument("--mixup-mode", default="batch", choices=("batch", "pair", "elem"), help="how mixup pairs")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--bce-loss", action="store_true", help="binary cross-entropy on the soft targets")
    g.add_argument("--repeated-aug", action=argparse.BooleanOptionalAction, default=True,
                   help="3-repeat augmentation sampler under DDP")
    g.add_argument("--eval-crop-ratio", type=float, default=0.875, help="centre-crop fraction in evaluation")


def _data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-set", default="IMNET", choices=("IMNET", "IMAGEFOLDER", "EMBEDDED", "SYNTHETIC"),
                   help="IMNET: train/ and val/ class folders; IMAGEFOLDER: any class folder; EMBEDDED: the "
                        "Animal-MNIST set that ships with the install; SYNTHETIC: random images (tests)")
    g.add_argument("--data-path", default="", help="folder of IMNET / IMAGEFOLDER")
    g.add_argument("--val-fraction", type=float, default=0.15, help="EMBEDDED / IMAGEFOLDER without val/")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the train/val split")
    g.add_argument("--synthetic-size", type=int, default=256, help="SYNTHETIC: training images")
    g.add_argument("--num_workers", type=int, default=10, help="data-loading processes")
    g.add_argument("--pin-mem", action=argparse.BooleanOptionalAction, default=False, help="pinned host memory")


def _run_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default="", help="where checkpoints, logs and args.yaml go (none: not saved)")
    g.add_argument("--device", default="", help="default: cuda if available, else cpu")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--resume", default="", help="checkpoint.pth to continue from exactly (restores its options)")
    g.add_argument("--start_epoch", type=int, default=0, help="first epoch of a fresh run")
    g.add_argument("--eval", action="store_true", help="evaluate only: accuracy, tokens, gates, FLOPs, images/s")
    g.add_argument("--allow-random-weights", action="store_true",
                   help="let --eval score a model without --model-path / --resume (untrained weights)")
    g.add_argument("--dist-eval", action=argparse.BooleanOptionalAction, default=True,
                   help="under torchrun, split evaluation over the processes")
    g.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=True,
                   help="measure images/s of the model and its teacher in --eval")
    g.add_argument("--cuda-graph-eval", action=argparse.BooleanOptionalAction, default=True,
                   help="on a GPU, evaluate (accuracy, tokens, gates, MACs) through CUDA-graph replays of the "
                        "forward (dyvm.serving): the same results without the host's launch work")
    g.add_argument("--throughput-cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="on a GPU, also time CUDA-graph replays of the forward (GPU throughput without the Python "
                   "launch overhead that bounds eager small models and bf16)")
    g.add_argument("--throughput-batch-size", type=int, default=128, help="batch of the images/s timing")
    g.add_argument("--throughput-iters", type=int, default=30, help="timed batches (median)")
    g.add_argument("--stop-epoch", type=int, default=None, help="stop after this many epochs although the schedule "
                   "spans --epochs (time-limited jobs); --resume checkpoint.pth continues exactly")
    g.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap training steps per epoch (tests)")
    add_progress_flag(g)
    g.add_argument("--local-rank", "--local_rank", type=int, default=0, help=argparse.SUPPRESS)


def read_config(path: str, _chain: tuple = ()) -> dict:
    """A YAML config as {option: value}, with `base: FILE` (relative to this file) read first and overridden
    by this file's keys, to any depth. Missing files, cycles and bad YAML are one-line ConfigErrors."""
    chain = _chain + (os.path.abspath(path),)
    if not os.path.isfile(path):
        via = f" (the base of {_chain[-1]})" if _chain else ""
        raise ConfigError(f"--config {path} does not exist{via}")
    with open(path) as f:
        try:
            cfg = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"--config {path} must be a mapping of option: value")
    cfg = {k.replace("-", "_"): v for k, v in cfg.items()}
    base = cfg.pop("base", None)
    if base is None:
        return cfg
    base_path = os.path.normpath(os.path.join(os.path.dirname(path), str(base)))
    if os.path.abspath(base_path) in chain:
        cycle = " -> ".join(os.path.basename(c) for c in chain + (os.path.abspath(base_path),))
        raise ConfigError(f"--config {chain[0]}: 'base:' goes round in a circle ({cycle})")
    return {**read_config(base_path, chain), **cfg}


def _yaml_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    cfg = read_config(path)
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(cfg) - known - {"config"})
    if unknown:
        raise ConfigError(f"--config {path}: unknown option(s) {unknown}")
    return cfg


# Options of a run that --resume does not take from the checkpoint: what to do now (resume, eval), where the
# weights come from (the checkpoint itself; its teacher is recorded separately), and when to stop.
NOT_RESUMED = ("config", "resume", "eval", "allow_random_weights", "model_path", "teacher_path", "stop_epoch",
               "start_epoch", "local_rank")


def _resume_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    from dyvm.checkpoint import CheckpointError, saved_args

    try:
        saved = saved_args(path)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    known = {a.dest for a in parser._actions}
    return {k: v for k, v in saved.items() if k in known and k not in NOT_RESUMED}


def _same(a, b) -> bool:
    norm = lambda v: list(v) if isinstance(v, (tuple, list)) else v  # noqa: E731
    return norm(a) == norm(b)


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
        need(getattr(args, name) >= 0, f"{flag_name(name)} must be >= 0, got {getattr(args, name)}")
    for name in ("model_path", "resume") + (() if args.eval else ("teacher_path",)):
        path = getattr(args, name)
        need(not path or os.path.isfile(path), f"{flag_name(name)} {path} does not exist")
    need(not args.eval or args.model_path or args.resume or args.allow_random_weights,
         "--eval needs trained weights: give --model-path (or --resume); --allow-random-weights scores an "
         "untrained model")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Options from (lowest first) the built-in defaults, the options saved in a --resume checkpoint, a
    --config YAML, and the command line. args._notes: lines for the log (e.g. which resumed options the
    command line or config changed)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    pre, _ = parser.parse_known_args(argv)
    resumed = {}
    if pre.resume and os.path.isfile(pre.resume):
        resumed = _resume_defaults(parser, pre.resume)
        parser.set_defaults(**resumed)
    if pre.config:
        parser.set_defaults(**_yaml_defaults(parser, pre.config))
    args = parser.parse_args(argv)
    validate(args)
    changed = [f"{flag_name(k)} {getattr(args, k)!r} (checkpoint: {v!r})" for k, v in sorted(resumed.items())
               if not _same(getattr(args, k), v)]
    args._notes = []
    if resumed:
        args._notes.append(f"options restored from {pre.resume}" + (f"; changed now: {', '.join(changed)}"
                                                                      if changed else ""))
    return args


def save_args(args, output_dir: str, name: str = "args.yaml") -> str:
    """Every option as used, in the output folder (re-usable as --config): args.yaml for training,
    eval_args.yaml for --eval (so evaluating into a training folder keeps the training's args.yaml)."""
    path = os.path.join(output_dir, name)
    values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(vars(args).items())
              if k not in ("local_rank", "config") and not k.startswith("_")}
    with open(path, "w") as f:
        yaml.safe_dump(values, f, sort_keys=True)
    return path
