"""The scan backward at Vim-S training shapes, for comparing two revisions of the kernel run by two checkouts.

    python benchmarks/scan_backward_ab.py --save /tmp/base.pt       # in the checkout of one revision
    python benchmarks/scan_backward_ab.py --compare /tmp/base.pt    # in the other: its results against those

Both directions, gated, channel-contiguous, B and C strided views of x_proj's output (the mixer's layouts; see
scan_train_tuning.inputs), batch 128, d_inner 768, d_state 16, L 197, bf16 and fp32, whole sequences and every
sample cut to its first 97 positions (the kept-only scans of a pruned model). For each case: microseconds per
call of scan_backward (the kernel and the reduction of its partial sums; triton.testing.do_bench, median) and,
with --compare, the largest relative difference of any gradient from the saved revision's. --dry-run: the
Triton interpreter on the CPU, tiny shapes (what the test suite runs).
"""
import argparse
import os
import sys

if "--dry-run" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from scan_train_tuning import inputs, rel  # noqa: E402


def cases(device, shape, kept):
    """(name, dtype, lengths or None) of every measured case."""
    for dname, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        yield f"{dname} whole", dtype, None
        yield f"{dname} kept {kept}", dtype, torch.full((shape[0],), kept, dtype=torch.int32, device=device)


def run(device, shape, kept, bench):
    """-> {case: (us, {gradient name: tensor})}"""
    from mamba_ssm.ops.triton import selective_scan as ss

    results = {}
    for name, dtype, lengths in cases(device, shape, kept):
        args, dout = inputs(dtype, device, *shape)
        _, ckpt = ss.scan_forward(*args, torch.empty_like(dout), want_ckpt=True, lengths=lengths)
        grads = ss.scan_backward(*args, dout, ckpt=ckpt, lengths=lengths)
        us = bench(lambda: ss.scan_backward(*args, dout, ckpt=ckpt, lengths=lengths))
        results[name] = (us, {k: v.cpu() for k, v in grads.items() if v is not None})
    return results


def report(results: dict, saved, label: str) -> list:
    """A line per case: its time and, against saved results (or None), the largest relative difference of any
    gradient and the saved time."""
    lines = []
    for name, (us, grads) in results.items():
        line = f"{label:8s} {name:14s} {us:9.1f} us"
        if saved is not None:
            worst = max((rel(g, saved[name][1][k]), k) for k, g in grads.items())
            line += f"   worst rel vs saved {worst[0]:.2e} ({worst[1]})   saved {saved[name][0]:9.1f} us"
        lines.append(line)
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--save", default="", help="write this revision's gradients here")
    p.add_argument("--compare", default="", help="compare with the gradients saved here")
    p.add_argument("--label", default="", help="a name for this checkout in the printed rows")
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    args = p.parse_args()
    if args.dry_run:
        from mamba_ssm.ops.dispatch import triton_on_cpu

        device, shape, kept, bench, ctx = "cpu", (2, 32, 19), 11, lambda fn: (fn(), 0.0)[1], triton_on_cpu()
    else:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/scan_backward_ab.py needs a CUDA GPU (or --dry-run)")
        from contextlib import nullcontext
        from triton.testing import do_bench

        device, shape, kept, ctx = "cuda", (128, 768, 197), 97, nullcontext()
        bench = lambda fn: do_bench(fn, warmup=10, rep=100) * 1e3  # noqa: E731  (us)
    with ctx:
        results = run(device, shape, kept, bench)
    for line in report(results, torch.load(args.compare) if args.compare else None, args.label):
        print(line, flush=True)
    if args.save:
        torch.save(results, args.save)


if __name__ == "__main__":
    main()
