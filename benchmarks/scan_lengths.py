"""The scan kernels at DyVM's kept lengths: what per-sample lengths cost against the whole sequence.

    python benchmarks/scan_lengths.py [--shares 0.7 0.49 0.343] [--dtype bf16] [--json FILE]
    python benchmarks/scan_lengths.py --dry-run        # CPU, Triton interpreter, tiny shapes: the checks alone

At Vim-S training shapes (batch 128, d_inner 768, L 197, both directions, gated), the training forward (with its
checkpoints) and the backward (with its partial sums' reduction), timed by replaying a CUDA graph of each call, on:
the whole sequence; per-sample lengths 1 + Binomial(196, share), as DyVM-S's predictors keep tokens at each stage
(share 0.7, 0.49, 0.343), in random order; the same lengths sorted longest first; every sample at their mean. The
kernels run the samples longest first themselves (mamba_ssm/ops/triton/selective_scan.py), so the three orders
should take about the same time: in the grid's order the random lengths had taken 9% to 15% longer than uniform
ones (benchmarks/results/train_longest_first_h200_2026-11-29.txt). Before timing, each variant's outputs and
gradients are checked: the sorted order's are the random order's, sample for sample, bit for bit (the samples'
order changes which program runs when, not what it computes).
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if "--dry-run" in sys.argv:  # (before Triton is imported)
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scan_train_tuning import inputs  # noqa: E402  (the Vim-S mixer's layouts at training)


def permuted(args: tuple, dout, order):
    """The scan's inputs (scan_train_tuning.inputs' form) and dout with the samples in `order`, each tensor in its
    own memory layout where it is dense (the kernels take another path for other layouts)."""
    u, delta, A, B, C, D, z, bias, softplus, gate, scale = args
    pick = lambda t, axis: torch.empty_like(t).copy_(t.index_select(axis, order))  # noqa: E731
    return (pick(u, 1), pick(delta, 1), A, pick(B, 1), pick(C, 1), D, pick(z, 0), bias, softplus, pick(gate, 0),
            scale), pick(dout, 0)


def run(args: tuple, dout, lengths):
    """(out, gradients) of a training forward and its backward."""
    from mamba_ssm.ops.triton import selective_scan as ss

    out = torch.empty_like(dout)
    _, ckpt = ss.scan_forward(*args, out, want_ckpt=True, lengths=lengths)
    return out, ss.scan_backward(*args, dout, ckpt=ckpt, lengths=lengths)


def check_order_free(args: tuple, dout, lengths) -> None:
    """The same outputs and gradients, sample for sample and bit for bit, with the samples sorted by length."""
    order = torch.argsort(lengths, descending=True, stable=True)
    out, grads = run(args, dout, lengths)
    s_args, s_dout = permuted(args, dout, order.to(dout.device))
    s_out, s_grads = run(s_args, s_dout, lengths[order])
    per_sample = {"du": 1, "ddelta": 1, "dB": 1, "dC": 1, "dz": 0, "dgate": 0}
    if not torch.equal(s_out, out.index_select(0, order.to(out.device))):
        raise AssertionError("the output depends on the samples' order")
    for name, axis in per_sample.items():
        if not torch.equal(s_grads[name], grads[name].index_select(axis, order.to(out.device))):
            raise AssertionError(f"{name} depends on the samples' order")


def time_call(fn, device) -> float:
    """Microseconds a call, from a replayed CUDA graph (no host launch time) on a GPU, else wall time."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - start)
    import triton

    torch.cuda.synchronize()
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=200)


def main(argv=None) -> int:
    p = argparse.ArgumentParser("benchmarks/scan_lengths.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--shares", nargs="+", type=float, default=[0.7, 0.49, 0.343])
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes, no timing")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if args.dry_run:
        from mamba_ssm.ops.dispatch import triton_on_cpu

        device, (batch, dim, seqlen) = torch.device("cpu"), (4, 64, 23)  # (two channel blocks)
        context = triton_on_cpu()
    elif torch.cuda.is_available():
        from contextlib import nullcontext

        device, (batch, dim, seqlen), context = torch.device("cuda"), (128, 768, 197), nullcontext()
    else:
        print("error: no CUDA device (--dry-run runs the checks on the CPU)", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    scan_args, dout = inputs(dtype, device, batch, dim, seqlen)
    g = torch.Generator().manual_seed(args.seed)
    rows = []
    with context:
        rows.append({"variant": "whole", "mean_length": float(seqlen),
                     **timings(scan_args, dout, None, device, args.dry_run)})
        for share in args.shares:
            kept = torch.binomial(torch.full((batch,), float(seqlen - 1)), torch.full((batch,), share), generator=g)
            lengths = (kept + 1).to(torch.int32)
            check_order_free(scan_args, dout, lengths.to(device))
            variants = {"random": lengths, "sorted": lengths.sort(descending=True).values,
                        "uniform": torch.full_like(lengths, int(round(float(lengths.float().mean()))))}
            for name, lens in variants.items():
                rows.append({"variant": name, "share": share, "mean_length": float(lens.float().mean()),
                             "max_length": int(lens.max()), **timings(scan_args, dout, lens.to(device), device,
                                                                      args.dry_run)})
    for r in rows:
        steps = r["mean_length"]
        times = "checked" if r["fwd_us"] is None else (
            f"fwd {r['fwd_us']:7.1f} us ({r['fwd_us'] / steps:5.2f} a step)  "
            f"bwd {r['bwd_us']:7.1f} us ({r['bwd_us'] / steps:5.2f} a step)")
        label = r["variant"] if "share" not in r else f"{r['variant']:7s} share {r['share']}"
        print(f"{label:20s} mean length {steps:6.1f}  {times}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": args.dtype, "shape": [batch, dim, seqlen], "rows": rows}, f, indent=1)
    return 0


def timings(scan_args: tuple, dout, lengths, device, dry_run: bool) -> dict:
    """{'fwd_us', 'bwd_us'}: the training forward and the backward at these lengths (None in a dry run)."""
    if dry_run:
        return {"fwd_us": None, "bwd_us": None}
    from mamba_ssm.ops.triton import selective_scan as ss

    out = torch.empty_like(dout)
    forward = lambda: ss.scan_forward(*scan_args, out, want_ckpt=True, lengths=lengths)  # noqa: E731
    _, ckpt = forward()
    return {"fwd_us": time_call(forward, device),
            "bwd_us": time_call(lambda: ss.scan_backward(*scan_args, dout, ckpt=ckpt, lengths=lengths), device)}


if __name__ == "__main__":
    sys.exit(main())
