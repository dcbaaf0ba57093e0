"""Where the host time of an eager forward goes, by component: dense Vim-S and DyVM-S (gates calibrated to the
authors' realised block keep ratio), bf16 autocast, no_grad. For each model: the host time per forward unwrapped
(until model(x) returns, no sync; median after warm-ups), then with the model's and the ops' functions wrapped in
timers: milliseconds per forward, calls per forward and microseconds per call of each (a wrapped call includes
the wrapped calls nested in it; each wrapper adds about a microsecond).

    PYTHONPATH=$PWD:$PWD/mamba-1p1p1 python3 benchmarks/host_breakdown.py > host_breakdown.txt
    [--device cuda] [--batch-size 128] [--img-size 224] [--warmup 10] [--iters 20]
"""
import argparse
import collections
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

import causal_conv1d.triton_utils as launch_utils
from causal_conv1d import triton_causal_conv1d
from dyvm.benchmark import AUTHORS_REALISED_BLOCK_KEEP_RATIO, build_model
from dyvm.models import vim as vim_module
from dyvm.models.dyvm import DyVM
from dyvm.models.mixer import DynamicMamba
from mamba_ssm.modules.mamba_simple import Mamba
from mamba_ssm.ops import bimamba_stacked
from mamba_ssm.ops.triton import selective_scan

# (owner, attribute, label): model structure first, then what runs inside the mixer
COMPONENTS = [
    (DyVM, "_prune", "pruning stage"),
    (DynamicMamba, "gate_head_for", "gate head (for the kernels; they run in mix)"),
    (DynamicMamba, "gate_logits", "gate head (ops: column, Linear)"),
    (DyVM, "_decide_gate", "gate decision (ops)"),
    (Mamba, "mix", "mix: conv, x/dt proj, scan, out_proj"),
    (Mamba, "in_proj_xz", "in_proj"),
    (Mamba, "inference_weights", "a layer's own weight check (only when the model's key changed)"),
    (vim_module.Block, "add_norm", "add + norm"),
    (vim_module.Vim, "embed", "embed"),
    (vim_module.Vim, "final_norm", "final norm"),
    (vim_module.Vim, "classify", "head"),
    (bimamba_stacked, "scan_output", "  mix: scan (incl. its launches)"),
    (selective_scan, "scan_forward", "  mix: scan launcher (scan + direction sum)"),
    (bimamba_stacked, "conv_apply", "  mix: conv (incl. its launch)"),
    (triton_causal_conv1d, "conv_forward", "  mix: conv launcher"),
    (launch_utils.FastLauncher, "__call__", "  every direct Triton launch"),
    (torch, "bmm", "  torch.bmm (x_proj, dt_proj)"),
    (F, "linear", "  F.linear (in_proj, out_proj, predictor)"),
]


@contextlib.contextmanager
def timed_components(totals: dict, counts: dict):
    """Wrap every COMPONENTS entry in a timer adding to totals / counts; the originals come back at the end."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in COMPONENTS]

    def timer(fn, label):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[label] += time.perf_counter() - start
                counts[label] += 1
        return timed
    try:
        for (owner, name, fn), (_, _, label) in zip(saved, COMPONENTS):
            setattr(owner, name, timer(fn, label))
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def host_times(model, x, dtype, iters: int) -> list:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype):
        for _ in range(iters):
            sync()
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
            sync()
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name} | torch {torch.__version__} | batch {args.batch_size} | bf16 autocast", flush=True)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    for model_name in ("vim_small", "dyvm_vim_small"):
        _, model, _ = build_model(model_name, device, args.img_size, block_keep_ratio=AUTHORS_REALISED_BLOCK_KEEP_RATIO,
                                  calib_batch=min(64, 4 * args.batch_size))
        host_times(model, x, torch.bfloat16, args.warmup)
        plain = statistics.median(host_times(model, x, torch.bfloat16, args.iters))
        totals, counts = collections.defaultdict(float), collections.defaultdict(int)
        with timed_components(totals, counts):
            wrapped = sum(host_times(model, x, torch.bfloat16, args.iters)) / args.iters
        print(f"== {model_name}: host {1e3 * plain:.2f} ms per forward ({1e3 * wrapped:.2f} ms wrapped)")
        for label, total in sorted(totals.items(), key=lambda kv: -kv[1]):
            print(f"   {label:62s} {1e3 * total / args.iters:7.2f} ms {counts[label] / args.iters:5.0f} calls "
                  f"{1e6 * total / counts[label]:7.1f} us each", flush=True)
        del model


if __name__ == "__main__":
    main()
