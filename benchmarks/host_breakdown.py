"""Where the host time of an eager forward goes, by component: dense Vim-S and DyVM-S (gates calibrated to the
authors' realised block keep ratio), bf16 autocast, no_grad. For each model: the host time per forward unwrapped
(until model(x) returns, no sync; median after warm-ups), then with the model's and the ops' functions wrapped in
timers: milliseconds per forward, calls per forward and microseconds per call of each (a wrapped call includes
the wrapped calls nested in it; each wrapper adds about a microsecond).

On a GPU also: each model's GPU time per forward (CUDA-graph replays, dyvm.serving), and the direct Triton
launches split into Triton's C launcher and our launch key (causal_conv1d.triton_utils.FastLauncher), with the
host time of a forward whose C launcher calls are skipped (the kernels do not run; nothing on the host reads
their outputs): what eager DyVM's host would cost if launching a Triton kernel cost nothing, against the host
time that eager DyVM-S at 1.3x dense Vim-S needs (dense's GPU time / 1.3).

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
from causal_conv1d import launch_replay
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
    (launch_replay, "replay", "  calls replayed from their launches (mixers, norms, fp32 Linears)"),
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


def _timed_launcher(launcher, totals: dict, skip: bool):
    """A remembered specialisation's launcher (Triton's C launch, or the compiled kernel's launcher) timed into
    totals["C launcher"] and counted, or not called (skip)."""
    def run(*args):
        start = time.perf_counter()
        if not skip:
            launcher(*args)
        totals["C launcher"] += time.perf_counter() - start
        totals["launches"] += 1
    return run


@contextlib.contextmanager
def split_launches(totals: dict, skip: bool = False, launchers=None):
    """Within the block, every direct launch of `launchers` (default: all that causal_conv1d.triton_utils has
    made) adds its C launcher's time to totals["C launcher"] (or skips it: skip=True), its launch key's time to
    totals["key"], and one to totals["launches"]. The launchers' caches and the key function come back after."""
    launchers = [f for _, f in launch_utils._launchers.values() if f] if launchers is None else launchers
    saved = [(f, dict(f.compiled)) for f in launchers]
    key_fn = launch_utils.specialization_key

    def timed_key(*args):
        start = time.perf_counter()
        try:
            return key_fn(*args)
        finally:
            totals["key"] += time.perf_counter() - start
    try:
        for f, entries in saved:
            for key, entry in entries.items():
                f.compiled[key] = entry._replace(launcher=_timed_launcher(entry.launcher, totals, skip))
        launch_utils.specialization_key = timed_key
        yield
    finally:
        launch_utils.specialization_key = key_fn
        for f, entries in saved:
            f.compiled.clear()
            f.compiled.update(entries)


def gpu_ms(model, x, dtype, iters: int) -> float:
    """The GPU's time per forward, from CUDA-graph replays (no host in the way): milliseconds."""
    from dyvm.serving import graphed

    fast = graphed(model, dtype=dtype)
    for _ in range(3):
        fast(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fast(x)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def launch_report(model, x, dtype, iters: int) -> dict:
    """Per forward on a GPU: direct launches, their C launcher and key milliseconds, and the host milliseconds
    (median) of forwards with the C launcher skipped."""
    totals = collections.defaultdict(float)
    with split_launches(totals):
        host_times(model, x, dtype, iters)
    skipped = collections.defaultdict(float)
    with split_launches(skipped, skip=True):
        no_launcher = statistics.median(host_times(model, x, dtype, iters))
    return {"launches": totals["launches"] / iters, "c_launcher_ms": 1e3 * totals["C launcher"] / iters,
            "key_ms": 1e3 * totals["key"] / iters, "host_no_launcher_ms": 1e3 * no_launcher}


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
    summary = {}
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
        if device.type == "cuda":
            summary[model_name] = launch_report(model, x, torch.bfloat16, args.iters)
            summary[model_name].update(host_ms=1e3 * plain, gpu_ms=gpu_ms(model, x, torch.bfloat16, args.iters))
        del model
    if summary:
        print(launch_summary(summary))


def launch_summary(summary: dict) -> str:
    """The GPU runs' table: host and GPU time per forward, the direct launches' split, the host without the C
    launcher (and without the key), against the host time that eager DyVM-S at 1.3x dense needs."""
    lines = [f"{'model':16s} {'host ms':>8s} {'GPU ms':>7s} {'launches':>8s} {'C launcher ms (us each)':>24s} "
             f"{'key ms (us each)':>17s} {'host, no C launcher':>20s} {'and no key':>11s}"]
    for name, r in summary.items():
        n = max(r["launches"], 1)
        lines.append(f"{name:16s} {r['host_ms']:8.2f} {r['gpu_ms']:7.2f} {r['launches']:8.0f} "
                     f"{r['c_launcher_ms']:11.2f} ({1e3 * r['c_launcher_ms'] / n:5.1f} us)   "
                     f"{r['key_ms']:6.2f} ({1e3 * r['key_ms'] / n:5.1f} us) {r['host_no_launcher_ms']:20.2f} "
                     f"{r['host_no_launcher_ms'] - r['key_ms']:11.2f}")
    if {"vim_small", "dyvm_vim_small"} <= set(summary):
        dense, dyvm = summary["vim_small"], summary["dyvm_vim_small"]
        need = max(dense["gpu_ms"], dense["host_ms"]) / 1.3
        free = max(dyvm["host_no_launcher_ms"] - dyvm["key_ms"], dyvm["gpu_ms"])
        lines.append(f"eager DyVM-S at 1.3x dense Vim-S needs a forward in {need:.2f} ms (dense: max(host, GPU) / 1.3); "
                     f"DyVM-S takes {max(dyvm['host_ms'], dyvm['gpu_ms']):.2f} ms now, {free:.2f} ms if its Triton "
                     f"launches cost nothing: {max(dense['gpu_ms'], dense['host_ms']) / free:.2f}x at best")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
