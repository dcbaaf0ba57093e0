"""The training step's smaller ops at Vim-S bf16 shapes (batch 128, L 197, d_inner 768): each as the code computes it
now against the way it was computed before, checked first, then timed by replaying a CUDA graph of each call.

    python benchmarks/train_small_ops.py [--json FILE]
    python benchmarks/train_small_ops.py --dry-run       # CPU, Triton interpreter, tiny shapes: the checks alone

- weight gradients: x_proj's and dt_proj's (mamba_ssm.ops.bimamba_stacked._weight_grad: blocks of samples summed
  in fp32) and in_proj's and out_proj's (linear_fp32.matmul_fp32_out), against one bf16 matmul and its cast to
  fp32 (what autograd did under autocast); error against the fp64 product of the same bf16 values;
- the norm's backward (layernorm_kernel._norm_backward: x's gradient in bf16 and the residual's in fp32 from the
  kernel) against the kernel writing fp32 and a cast after it;
- the per-sample partial sums of the scan's dA, dD + d delta_bias and the conv's dweight, dbias
  (causal_conv1d.partial_sums.sum_middle, one launch each) against torch's sums.
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


def timer(device: str):
    """us per call: CUDA-graph replays on a GPU; on the CPU (the dry run) one plain call."""
    if device == "cuda":
        from triton.testing import do_bench_cudagraph

        def cuda_time(fn):
            fn()
            torch.cuda.synchronize()
            return do_bench_cudagraph(fn, rep=200) * 1e3
        return cuda_time

    def cpu_time(fn):
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    return cpu_time


def rel(got, want) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-300)).item()


def weight_gradients(shape: dict, device: str, bench) -> list:
    from mamba_ssm.ops.bimamba_stacked import _weight_grad
    from mamba_ssm.ops.linear_fp32 import matmul_fp32_out

    batch, rows, d, rank, n_out, width = shape["batch"], shape["rows"], shape["d"], shape["rank"], shape["x_out"], \
        shape["width"]
    bf = torch.bfloat16
    x_dbl = torch.randn(2, rows, n_out, device=device, dtype=bf)
    cases = {"x_proj": (torch.randn(2, rows, n_out, device=device, dtype=bf), torch.randn(2, rows, d, device=device,
                                                                                            dtype=bf)),
             "dt_proj": (torch.randn(2, rows, d, device=device, dtype=bf), x_dbl[..., :rank])}
    out = []
    for name, (d_out, x) in cases.items():
        exact = torch.bmm(d_out.double().transpose(1, 2), x.double())
        new = lambda: _weight_grad(d_out, x, batch, torch.float32)  # noqa: E731
        old = lambda: torch.bmm(d_out.transpose(1, 2), x).float()  # noqa: E731
        out.append(dict(op=f"{name} weight gradient", new_us=bench(new), old_us=bench(old),
                        new_err=rel(new(), exact), old_err=rel(old(), exact)))
    for name, n, k in (("in_proj", 2 * d, width), ("out_proj", width, d)):
        dout, x = torch.randn(rows, n, device=device, dtype=bf), torch.randn(rows, k, device=device, dtype=bf)
        exact = dout.double().t() @ x.double()
        new = lambda: matmul_fp32_out(dout.t(), x)  # noqa: E731
        old = lambda: dout.t().mm(x).float()  # noqa: E731
        out.append(dict(op=f"{name} weight gradient", new_us=bench(new), old_us=bench(old),
                        new_err=rel(new(), exact), old_err=rel(old(), exact)))
    return out


def norm_backward(shape: dict, device: str, bench) -> list:
    from mamba_ssm.ops.triton import layernorm_kernel as ln

    rows, width = shape["rows"], shape["width"]
    x = torch.randn(rows, width, device=device, dtype=torch.bfloat16)
    residual, weight = torch.randn(rows, width, device=device), torch.randn(width, device=device)
    dy = torch.randn(rows, width, device=device, dtype=torch.bfloat16)
    dres = torch.randn(rows, width, device=device)
    _, res_out, rstd, mean = ln._norm_forward(x, weight, None, residual, 1e-5, True, True)
    block_m, block_n = ln.row_blocks(width)
    n_prog = -(-rows // block_m)

    def old():  # the kernel writing fp32, then x's gradient cast to bf16
        dx = torch.empty((rows, width), device=device)
        dw = torch.empty((n_prog, width), device=device)
        ln.launch(ln._norm_bwd_kernel, (n_prog,), res_out, weight, dy, dres, rstd, mean, dx, dx, dw, dw, rows, width,
                  HAS_DRES=True, HAS_BIAS=False, IS_RMS=True, HAS_DX2=False, BLOCK_M=block_m, BLOCK_N=block_n,
                  num_warps=4)
        return dx.to(torch.bfloat16), dx, dw.sum(0)

    def new():
        dx, dres_grad, dw, _ = ln._norm_backward(dy, dres, res_out, weight, None, rstd, mean, torch.bfloat16,
                                                 torch.float32, True)
        return dx, dres_grad, dw
    (dx_new, dres_new, dw_new), (dx_old, dres_old, dw_old) = new(), old()
    if not (torch.equal(dres_new, dres_old) and torch.equal(dw_new, dw_old)):
        raise AssertionError("the norm backward's fp32 gradients differ from the kernel's fp32 ones")
    return [dict(op="norm backward (bf16 x, fp32 residual)", new_us=bench(new), old_us=bench(old),
                 new_err=rel(dx_new, dres_old), old_err=rel(dx_old, dres_old))]


def partial_sums(shape: dict, device: str, bench) -> list:
    from causal_conv1d.partial_sums import sum_middle

    batch, d, n = shape["batch"], shape["d"], shape["d_state"]
    out = []
    for name, shapes in (("scan dA, dD + d delta_bias", [(2, batch, d * n), (4, batch, d)]),
                         ("conv dweight, dbias", [(2, batch, d * 4), (2, batch, d)])):
        parts = [torch.randn(s, device=device) for s in shapes]
        new = lambda: sum_middle(*parts)  # noqa: E731
        old = lambda: [p.sum(1) for p in parts]  # noqa: E731
        exact = [p.double().sum(1) for p in parts]
        out.append(dict(op=f"per-sample sums: {name}", new_us=bench(new), old_us=bench(old),
                        new_err=max(rel(g, e) for g, e in zip(new(), exact)),
                        old_err=max(rel(g, e) for g, e in zip(old(), exact))))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes: the checks alone")
    p.add_argument("--json", default="", help="write the rows here")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("train_small_ops.py: no GPU here (use --dry-run for the CPU checks)", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    shape = dict(batch=4, rows=4 * 9, d=32, rank=3, x_out=3 + 2 * 16, width=16, d_state=16) if args.dry_run else \
        dict(batch=128, rows=128 * 197, d=768, rank=24, x_out=24 + 2 * 16, width=384, d_state=16)
    torch.manual_seed(0)
    bench = timer(device)
    rows = weight_gradients(shape, device, bench) + norm_backward(shape, device, bench) + \
        partial_sums(shape, device, bench)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"
    print(f"{name}, torch {torch.__version__}, shapes {shape}")
    print(f"{'op':44s} {'now us':>8s} {'before':>8s} {'err now':>9s} {'before':>9s}")
    for r in rows:
        print(f"{r['op']:44s} {r['new_us']:8.1f} {r['old_us']:8.1f} {r['new_err']:9.1e} {r['old_err']:9.1e}")
    slack = 2.5 if args.dry_run else 1.0  # (the interpreter's casts to bf16 truncate; the GPU's round to nearest)
    for r in rows:
        if not r["new_err"] <= slack * max(r["old_err"], 1e-6):
            raise AssertionError(f"{r['op']}: error {r['new_err']:.1e} against {r['old_err']:.1e} before")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, torch=torch.__version__, shape=shape, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
