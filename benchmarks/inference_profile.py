"""Where an inference forward spends its device time: per kernel, and per part of the model.

    PYTHONPATH=$PWD:$PWD/mamba-1p1p1 python3 benchmarks/inference_profile.py [--models vim_small dyvm_vim_small]
        [--dtypes bf16 fp32] [--batch-size 128] [--replay-kernels]

For each model and dtype: the graph replay's time per forward (dyvm.serving, CUDA only), then torch.profiler over
eager forwards (the same kernels): the kernels that take the most time, and the device time under each part
of the model (patch embedding, add + norm, in_proj, gate heads, mixer, pruning stages), marked with
record_function. On a CPU the times are the ops' CPU times (for a dry run). DyVM gates are calibrated to the
authors' realised keep ratio, with torch's seed 0 (dyvm.benchmark).
"""
import argparse
import sys
import time
from contextlib import ExitStack
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from dyvm.benchmark import AUTHORS_REALISED_BLOCK_KEEP_RATIO, DTYPES, build_model
from dyvm.serving import autocast_context, graphed

PART = "part: "


def _marked(cls, method: str, label: str):
    """A mock.patch that runs cls.method under record_function(PART + label)."""
    inner = getattr(cls, method)

    def wrapper(*args, **kwargs):
        with record_function(PART + label):
            return inner(*args, **kwargs)
    return mock.patch.object(cls, method, wrapper)


def _parts():
    from dyvm.models.dyvm import DyVM
    from dyvm.models.mixer import DynamicMamba
    from dyvm.models.vim import Block, Vim
    from mamba_ssm.modules.mamba_simple import Mamba

    return [_marked(Vim, "embed", "embed"), _marked(Block, "add_norm", "add + norm"),
            _marked(Mamba, "in_proj_xz", "in_proj"), _marked(Mamba, "mix", "mixer (conv, scan, out_proj)"),
            _marked(DynamicMamba, "gate_head_for", "gate heads"), _marked(DynamicMamba, "gate_logits", "gate heads"),
            _marked(DyVM, "_prune", "pruning stages")]


def part_times(prof, cuda: bool, iters: int) -> dict:
    """{part: (ms per forward, calls per forward)}: on a GPU the device time of the kernels launched inside the
    part's CPU ranges (kernels matched to their launch calls by correlation id: Triton's launches too, which
    torch.profiler's own per-op attribution misses), on a CPU the ranges' CPU time."""
    events = prof.profiler.kineto_results.events()
    cpu = torch.autograd.DeviceType.CPU
    ranges = sorted((e.start_ns(), e.end_ns(), e.name()[len(PART):]) for e in events
                    if e.device_type() == cpu and e.name().startswith(PART))
    totals = {}
    for _, _, label in ranges:
        totals[label] = (0.0, totals.get(label, (0.0, 0))[1] + 1)
    if not cuda:
        for start, end, label in ranges:
            totals[label] = (totals[label][0] + (end - start) / 1e6, totals[label][1])
    else:
        launched = {e.correlation_id(): e.start_ns() for e in events
                    if e.device_type() == cpu and e.name().startswith("cu")}  # runtime calls: cudaLaunchKernel, ...
        for e in events:  # kernels, memsets, copies (not the parts' own GPU-side annotations)
            if e.device_type() == cpu or e.is_user_annotation() or e.name().startswith(PART) \
                    or e.correlation_id() not in launched:
                continue
            when = launched[e.correlation_id()]
            for start, end, label in ranges:  # (parts do not nest)
                if start <= when <= end:
                    totals[label] = (totals[label][0] + e.duration_ns() / 1e6, totals[label][1])
                    break
    return {label: (ms / iters, count // iters) for label, (ms, count) in totals.items()}


def graph_ms(model, x, dtype, iters: int = 20) -> float:
    fast = graphed(model, dtype=dtype)
    for _ in range(3):
        fast(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fast(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e3


def profile_forward(model, x, dtype, iters: int = 4, top: int = 25) -> str:
    cuda = x.is_cuda
    with torch.no_grad(), autocast_context(x.device.type, dtype), ExitStack() as stack:
        for _ in range(2):
            model(x)
        for patch in _parts():
            stack.enter_context(patch)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(iters):
                model(x)
            if cuda:
                torch.cuda.synchronize()
    events = prof.key_averages()

    def own(e):  # time of the event itself: a kernel's device time, or an op's CPU time on a CPU
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    def under(e):
        return e.device_time_total if cuda else e.cpu_time_total
    # kernels (CUDA: device-side events with their own time; CPU: aten ops)
    leaves = [e for e in events if own(e) > 0 and not e.key.startswith(PART)
              and (not cuda or e.device_type == torch.autograd.DeviceType.CUDA)]
    total, listing = _kernel_lines(leaves, own, iters, top)
    lines = [f"  kernels: {total}"]
    for label, (ms, count) in part_times(prof, cuda, iters).items():
        lines.append(f"  part {label:30s} {ms:8.3f} ms  {count}x")
    return "\n".join(lines + listing)


def _kernel_lines(leaves: list, own, iters: int, top: int) -> tuple:
    """(total time and launches per forward, the `top` kernels' lines) of profiler events with their own times."""
    total = sum(own(e) for e in leaves) / iters
    listing = [f"  {own(e) / iters / 1e3:8.3f} ms {e.count // iters:5d}x  {e.key[:110]}"
               for e in sorted(leaves, key=own, reverse=True)[:top]]
    return f"{total / 1e3:.3f} ms per forward, {sum(e.count for e in leaves) // iters} launches", listing


def replay_kernels(model, x, dtype, iters: int = 3, top: int = 25) -> str:
    """The kernels of a graph replay (dyvm.serving, CUDA only): those of an eager forward, plus whatever the graph
    recomputes at every replay that eager calls keep (the census that found the weights derived in the graphs)."""
    fast = graphed(model, dtype=dtype)
    for _ in range(3):
        fast(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fast(x)
        torch.cuda.synchronize()
    own = lambda e: e.self_device_time_total  # noqa: E731
    total, listing = _kernel_lines([e for e in prof.key_averages() if own(e) > 0], own, iters, top)
    return "\n".join([f"  graph replay kernels: {total}"] + listing)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["vim_small", "dyvm_vim_small"])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--top", type=int, default=25, help="kernels listed per model and dtype")
    p.add_argument("--replay-kernels", action="store_true",
                   help="on a GPU, also list the kernels of a graph replay (the graphed forward's own census)")
    args = p.parse_args(argv)
    for name in args.models:
        torch.manual_seed(0)
        keep = AUTHORS_REALISED_BLOCK_KEEP_RATIO if name.startswith("dyvm") else None
        _, model, realised = build_model(name, args.device, args.img_size, block_keep_ratio=keep,
                                         calib_batch=max(8, min(64, args.batch_size)))
        x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=args.device)
        for dt in args.dtypes:
            dtype = DTYPES[dt]
            head = f"===== {name} {dt} batch {args.batch_size}"
            if realised is not None:
                head += f" (realised block keep ratio {realised:.3f})"
            if x.is_cuda:
                ms = graph_ms(model, x, dtype)
                head += f": graph replay {ms:.2f} ms per forward ({args.batch_size / ms * 1e3:.0f} images/s)"
            print(head, flush=True)
            if x.is_cuda and args.replay_kernels:
                print(replay_kernels(model, x, dtype, top=args.top), flush=True)
            print(profile_forward(model, x, dtype, top=args.top), flush=True)
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
