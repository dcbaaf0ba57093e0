"""The gated inference scan (DyVM's two directions in one launch, a program per (sample, direction, channel
block)) under patterns of gates, with the walks that run dispatched first (the default, `active_first`) and on
the plain grid, where gated-off programs return at once but sit among the others. Vim-S shapes (d_inner 768,
d_state 16, the mixer's channel-contiguous layout), microseconds per call from CUDA-graph replays (the scan
and its direction sum), one line of JSON per row, then a table.

    PYTHONPATH=$PWD:$PWD/mamba-1p1p1 python3 benchmarks/scan_gate_order.py > scan_gate_order.jsonl
    [--device cuda] [--batch-size 128] [--seqlens 197 68] [--dtypes bf16 fp32]

Patterns: on (every gate 1), 3q and half (each gate on with probability 3/4 or 1/2), dir1off (direction 1 off
in every sample), halfsamples (both directions off in the first half of the batch). "one" is a single direction
with no gates, for scale. Before timing, each pattern's outputs are compared: both grids must agree bit for bit.
On a CPU (a test runs it there on tiny shapes) the kernels run in Triton's interpreter and the times are wall
clock, meaningless as speed.
"""
import argparse
import json
import time

import torch

from dyvm.benchmark import environment
from mamba_ssm.ops.triton.selective_scan import scan_forward

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PATTERNS = ("on", "3q", "half", "dir1off", "halfsamples")


def scan_inputs(R, batch, dim, seqlen, dtype, device, d_state=16):
    """What the Vim mixer passes: (R, b, d, L) views of channel-contiguous memory, B and C slices of x_proj's
    output, a z shared by the directions, and an output view in the same layout."""
    def cl(*shape):
        return torch.randn(*shape[:-2], shape[-1], shape[-2], device=device, dtype=dtype).transpose(-1, -2)
    u, delta = cl(R, batch, dim, seqlen), cl(R, batch, dim, seqlen) * 0.5 - 1
    A = -torch.exp(torch.rand(R, d_state, dim, device=device) * 2).transpose(1, 2)
    xdbl = torch.randn(R, batch * seqlen, 24 + 2 * d_state, device=device, dtype=dtype)
    B = xdbl[..., 24:24 + d_state].reshape(R, batch, seqlen, 1, d_state).permute(0, 1, 3, 4, 2)
    C = xdbl[..., 24 + d_state:].reshape(R, batch, seqlen, 1, d_state).permute(0, 1, 3, 4, 2)
    D, bias = torch.randn(R, dim, device=device), torch.rand(R, dim, device=device) - 4
    z = cl(batch, dim, seqlen)
    return u, delta, A, B, C, D, z, bias


def gate_pattern(name, batch, device, generator):
    gate = torch.ones(batch, 2)
    if name in ("3q", "half"):
        gate = (torch.rand(batch, 2, generator=generator) < (0.75 if name == "3q" else 0.5)).float()
    elif name == "dir1off":
        gate[:, 1] = 0
    elif name == "halfsamples":
        gate[: batch // 2] = 0
    return gate.to(device)


def call_time_us(fn, device, calls=10, reps=10):
    """Microseconds per call: CUDA-graph replays of `calls` calls on a GPU, a wall-clock loop elsewhere."""
    if device != "cuda":  # (one call: the interpreter is slow, and its time means nothing)
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / reps / calls)
    return best


def rows_for(dtype_name, seqlen, args, generator):
    dtype, batch, dim = DTYPES[dtype_name], args.batch_size, args.dim
    one = scan_inputs(1, batch, dim, seqlen, dtype, args.device)
    two = scan_inputs(2, batch, dim, seqlen, dtype, args.device)
    out_one = torch.empty(batch, seqlen, dim, device=args.device, dtype=dtype).transpose(1, 2)
    outs = [torch.empty_like(out_one) for _ in range(2)]
    no_gate = torch.ones(batch, 1, device=args.device)
    base = {"dtype": dtype_name, "L": seqlen, "batch": batch, "d_inner": dim}
    yield dict(base, pattern="one direction", plain_us=round(call_time_us(
        lambda: scan_forward(*one, True, no_gate, 1.0, out_one), args.device), 1))
    for pattern in PATTERNS:
        gate = gate_pattern(pattern, batch, args.device, generator)
        calls = [lambda first=first, out=out: scan_forward(*two, True, gate, 0.5, out, split_dirs=True,
                                                           active_first=first)
                 for first, out in zip((False, True), outs)]
        for call in calls:
            call()
        if not torch.equal(*outs):
            raise SystemExit(f"error: {pattern} {dtype_name} L {seqlen}: the two grids disagree")
        plain, first = (call_time_us(call, args.device) for call in calls)
        yield dict(base, pattern=pattern, on=round(gate.mean().item(), 3), plain_us=round(plain, 1),
                   active_first_us=round(first, 1), speedup=round(plain / first, 3))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--dim", type=int, default=768, help="d_inner (Vim-S: 768)")
    p.add_argument("--seqlens", type=int, nargs="+", default=[197, 68])
    p.add_argument("--dtypes", nargs="+", default=["bf16"], choices=sorted(DTYPES))
    args = p.parse_args(argv)
    print(json.dumps({"environment": environment()}), flush=True)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for dtype_name in args.dtypes:
        for seqlen in args.seqlens:
            for row in rows_for(dtype_name, seqlen, args, generator):
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{'dtype':5s} {'L':>4s} {'pattern':14s} {'on':>5s} {'plain us':>9s} {'active first us':>16s} {'speed-up':>8s}")
    for r in rows:
        print(f"{r['dtype']:5s} {r['L']:4d} {r['pattern']:14s} {r.get('on', 1.0):5.2f} {r['plain_us']:9.1f} "
              f"{r.get('active_first_us', float('nan')):16.1f} {r.get('speedup', float('nan')):8.3f}")


if __name__ == "__main__":
    main()
