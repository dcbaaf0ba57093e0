"""The scan kernels' launch parameters at training shapes: Vim-S's bidirectional layer (d_inner 768, d_state 16,
L 197, both directions, gated, channel-contiguous as the mixer passes them), batch 128, bf16 and fp32.

    python benchmarks/scan_train_tuning.py --out tuning.json    # then MAMBA_TRITON_TUNING=tuning.json

Times the training forward (which stores checkpoints) under register caps, and the backward under its piece
length (sub_chunk), the scratch's eviction policy, register caps, prefetch, where it sums dB and dC over channels
(lane_sums: in the adjoint walk, or from the scratch after each walk), where the walks' scratch lies (smem_scratch:
shared or global memory) and whether it asks L2 and L1 for each chunk's inputs ahead (l2_prefetch, l1_prefetch: they
may pay differently on GPUs other than the H200 they were chosen on). Every configuration is first compared with
the default launch's results (they must agree to rounding), then timed (triton.testing.do_bench, median). Writes
the fastest as a tuning file. benchmarks/kernels.py --sweep covers the inference forward and single-direction
backward; this script times what a training step runs.
"""
import argparse
import json
import os
import sys

if "--dry-run" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

FWD_CAPS = (0, 192, 168, 160, 128)
# (block_d, num_warps, prefetch, sub_chunk, scratch_evict, maxnreg, sum_steps, lane_sums, smem_scratch, l2_prefetch,
# l1_prefetch); the first is the reference launch (sum_steps matters only without lane_sums: the channel sums then come
# from the scratch after each walk, which is then in global memory; scratch_evict only with the scratch in global
# memory; l1_prefetch only with l2_prefetch)
BWD_KEYS = ("block_d", "num_warps", "prefetch", "sub_chunk", "scratch_evict", "maxnreg", "sum_steps", "lane_sums",
            "smem_scratch", "l2_prefetch", "l1_prefetch")
BWD_OPTIONAL = 4  # (the last four may be left out on the command line: 1, as written before they existed)
_DEFAULT = (32, 1, True, 8, "evict_last", 0, 4, True, True, True, True)


def _variant(**changes) -> tuple:
    """_DEFAULT with some of BWD_KEYS' values changed."""
    cfg = {**dict(zip(BWD_KEYS, _DEFAULT)), **changes}
    return tuple(cfg[k] for k in BWD_KEYS)


BWD_CONFIGS = (_DEFAULT, _variant(maxnreg=200), _variant(maxnreg=168), _variant(prefetch=False),
               _variant(sub_chunk=16), _variant(sub_chunk=4), _variant(l1_prefetch=False),
               _variant(l2_prefetch=False, l1_prefetch=False), _variant(smem_scratch=False),
               _variant(smem_scratch=False, scratch_evict=""), _variant(lane_sums=False, smem_scratch=False),
               _variant(lane_sums=False, smem_scratch=False, sum_steps=8))


def inputs(dtype, device, b, d, L, N=16, R=2, dt_rank=24):
    """The mixer's layouts: u, delta (R, b, d, L) and z (b, d, L) channel-contiguous, B and C strided views of
    x_proj's output (rows of dt_rank + 2N elements, Vim-S's 56: results before 2026-11-28 10:00 UTC used rows of 80,
    whose strides are all divisible by 16, which hid a load that Vim-S's rows made scalar), one gate per sample and
    direction."""
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    u = r(R, b, L, d).to(dtype).transpose(2, 3)
    delta = (0.5 * r(R, b, L, d) - 1).to(dtype).transpose(2, 3)
    A = -torch.rand(R, d, N, device=device, generator=g) - 0.2
    xdbl = r(R, b * L, dt_rank + 2 * N).to(dtype)
    B = xdbl[..., dt_rank:dt_rank + N].reshape(R, b, L, 1, N).permute(0, 1, 3, 4, 2)
    C = xdbl[..., dt_rank + N:].reshape(R, b, L, 1, N).permute(0, 1, 3, 4, 2)
    z = r(b, L, 2 * d).to(dtype).transpose(1, 2)[:, d:]
    gate = torch.ones(b, R, device=device)
    dout = r(b, L, d).to(dtype).transpose(1, 2)
    return (u, delta, A, B, C, r(R, d), z, 0.1 * r(R, d), True, gate, 0.5), dout


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def tune(dtype, device, shape, bench, fwd_caps, bwd_configs):
    """-> (fwd entry, bwd entry, rows): the fastest agreeing configurations and every measurement."""
    from mamba_ssm.ops.triton import selective_scan as ss

    args, dout = inputs(dtype, device, *shape)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    rows, fwd_best, bwd_best = [], None, None
    ref = torch.empty_like(dout)
    ss.scan_forward(*args, ref, want_ckpt=True, maxnreg=0)
    for cap in fwd_caps:
        out = torch.empty_like(dout)
        ss.scan_forward(*args, out, want_ckpt=True, maxnreg=cap)
        err, t = rel(out, ref), bench(lambda: ss.scan_forward(*args, out, want_ckpt=True, maxnreg=cap))
        rows.append({"kernel": "fwd+ckpt", "maxnreg": cap, "us": t, "rel_vs_default": err})
        if err < tol and (fwd_best is None or t < fwd_best[0]):
            fwd_best = (t, cap)
    _, ckpt = ss.scan_forward(*args, ref, want_ckpt=True)
    want = None
    for cfg in bwd_configs:
        kw = dict(zip(BWD_KEYS, cfg))
        got = ss.scan_backward(*args, dout, ckpt=ckpt, **kw)
        want = want or got
        err = max(rel(got[k], want[k]) for k in want if want[k] is not None)
        t = bench(lambda: ss.scan_backward(*args, dout, ckpt=ckpt, **kw))
        rows.append({"kernel": "bwd", **kw, "us": t, "rel_vs_first": err})
        if err < tol and (bwd_best is None or t < bwd_best[0]):
            bwd_best = (t, kw)
    return {"ckpt_maxnreg": fwd_best[1]}, bwd_best[1], rows


def _bwd_config(text: str) -> tuple:
    """'32,1,1,8,evict_last,0,4,1,1,1,1' -> (32, 1, True, 8, 'evict_last', 0, 4, True, True, True, True), in BWD_KEYS'
    order (the last BWD_OPTIONAL may be left out: 1, as written before they existed)."""
    parts = text.split(",")
    if len(BWD_KEYS) - BWD_OPTIONAL <= len(parts) < len(BWD_KEYS):
        parts += ["1"] * (len(BWD_KEYS) - len(parts))
    if len(parts) != len(BWD_KEYS):
        raise argparse.ArgumentTypeError(f"{text!r}: want {len(BWD_KEYS)} values ({','.join(BWD_KEYS)})")
    try:
        block_d, warps, prefetch, sub_chunk, evict, maxnreg, sum_steps, *flags = parts
        return (int(block_d), int(warps), bool(int(prefetch)), int(sub_chunk), evict, int(maxnreg), int(sum_steps),
                *(bool(int(f)) for f in flags))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="scan_train_tuning.json", help="the tuning file (MAMBA_TRITON_TUNING)")
    p.add_argument("--results", default="", help="also write every measurement here (JSON)")
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes, two configurations")
    p.add_argument("--bwd-configs", nargs="+", type=_bwd_config, default=None, metavar="CFG",
                   help="backward launches to time instead of the built-in list, each as comma-separated values of "
                        f"{','.join(BWD_KEYS)} (prefetch and the last four 0/1, evict '' for none); the "
                        "first is the reference")
    p.add_argument("--dtypes", nargs="+", choices=("bf16", "fp32"), default=["bf16", "fp32"])
    args = p.parse_args()
    if args.dry_run:
        from mamba_ssm.ops.dispatch import triton_on_cpu

        device, shape, fwd_caps, bwd_configs = "cpu", (2, 32, 19), FWD_CAPS[:2], (BWD_CONFIGS[0], BWD_CONFIGS[-2])
        bench = lambda fn: (fn(), 1.0)[1]  # noqa: E731
        ctx = triton_on_cpu()
    else:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/scan_train_tuning.py needs a CUDA GPU (or --dry-run)")
        from contextlib import nullcontext
        from triton.testing import do_bench

        device, shape, fwd_caps, bwd_configs = "cuda", (128, 768, 197), FWD_CAPS, args.bwd_configs or BWD_CONFIGS
        bench = lambda fn: do_bench(fn, warmup=10, rep=50) * 1e3  # noqa: E731  (us)
        ctx = nullcontext()
    from mamba_ssm.ops.triton.selective_scan import _tuning_key

    tuning, results = {"fwd": {}, "bwd": {}}, {"card": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                               "command": " ".join(sys.argv), "rows": {}}
    with ctx:
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            if name not in args.dtypes:
                continue
            key = _tuning_key(inputs(dtype, device, 1, 16, 3)[0][0])
            tuning["fwd"][key], tuning["bwd"][key], rows = tune(dtype, device, shape, bench, fwd_caps, bwd_configs)
            results["rows"][name] = rows
            for row in rows:
                print(name, json.dumps(row), flush=True)
    json.dump(tuning, open(args.out, "w"), indent=1)
    if args.results:
        json.dump({**results, "tuning": tuning}, open(args.results, "w"), indent=1)
    print("tuning:", json.dumps(tuning))


if __name__ == "__main__":
    main()
