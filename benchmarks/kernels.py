"""Kernel benchmark: checks our Triton kernels against the references at full size, then times them
against the upstream CUDA kernels (mamba-ssm 2.3.2.post1 / causal-conv1d 1.7.0) at Vim's shapes.

    python benchmarks/kernels.py --out results.json              # ours + reference (+ upstream if built)
    python benchmarks/kernels.py --upstream-only --out up.json   # run in a separate process (see below)

The upstream packages are installed into their own folder (`--target`) and timed in a separate process
whose sys.path holds them instead of this repository, because both packages are named mamba_ssm.
Timings: median of triton.testing.do_bench (which flushes L2 between runs), on fresh random inputs.
Shapes (docs/reference.md section 5): batch 128, L 197, d_inner 384 / 768 / 1536, d_state 16, one B/C group, with D,
z, delta_bias and softplus. "min bytes" counts each input read once and each output written once.
"""
import argparse
import json
import os
import sys
import time

if "--dry-run" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: CPU threads that do not spin

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

BATCH, SEQLEN, D_STATE, WIDTH = 128, 197, 16, 4
DIMS = (384, 768, 1536)
S_DIM, HIDDEN = 768, 384  # Vim-S: d_inner, and the width of the residual stream (norm)
DEVICE = "cuda"


CHECK_BATCH = 16  # batch of the DyVM-op check (check_ours)


def dry_run_setup():
    """--dry-run: every code path on CPU through the Triton interpreter at tiny shapes, one call per
    timing (timings meaningless): catches a broken benchmark before it costs GPU time; run by the tests.
    The sweeps keep one configuration per code path (layout of the lanes, prefetch or not), and graph
    replays (CUDA only) are not repeated as second eager calls: the interpreter is slow."""
    global BATCH, SEQLEN, DIMS, S_DIM, HIDDEN, DEVICE, CHECK_BATCH, bench, bench_graph
    global FWD_SWEEP, BWD_SWEEP, CONV_SWEEP, CONV_BWD_SWEEP
    BATCH, SEQLEN, DIMS, S_DIM, HIDDEN, DEVICE, CHECK_BATCH = 2, 11, (32,), 32, 16, "cpu", 4
    FWD_SWEEP = tuple({(c[3], c[4]): c for c in FWD_SWEEP}.values())  # (lanes_on_channels, prefetch)
    BWD_SWEEP = tuple({(c[2], c[3] == 16): c for c in BWD_SWEEP}.values())  # prefetch, sub-chunks or not
    CONV_SWEEP = (CONV_SWEEP[0], CONV_SWEEP[-1])
    CONV_BWD_SWEEP = {k: (v[0], v[-1]) for k, v in CONV_BWD_SWEEP.items()}

    def bench(fn, warmup=0, rep=0):  # noqa: F811
        fn()
        return 1.0

    def bench_graph(fn, warmup=0, rep=0):  # noqa: F811
        return 1.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bench(fn, warmup=25, rep=100):
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1e3  # us


def bench_graph(fn, warmup=25, rep=100):
    """The GPU time of fn without the host: fn captured once in a CUDA graph, the replays timed as bench
    times calls. Where an eager call's Python overhead (custom-op dispatch, Triton's launcher) exceeds its
    GPU time, bench measures the host and this the kernels."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graph capture requires
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as e:  # keep going: the eager timing stands, the table shows nan
        print(f"CUDA graph capture failed: {e!r}", flush=True)
        return float("nan")
    return bench(graph.replay, warmup, rep)


def timed(results, key, fn):
    """Eager time under key, graph-replay time under key + '_graph'."""
    results[key] = bench(fn)
    results[key + "_graph"] = bench_graph(fn)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def scan_inputs(dim, dtype, channels_last=False, requires_grad=False):
    batch, seqlen = BATCH, SEQLEN
    def act(*shape):  # (b, d, L), optionally with channels-last memory
        if channels_last:
            return torch.randn(shape[0], shape[2], shape[1], device=DEVICE, dtype=dtype).transpose(1, 2)
        return torch.randn(*shape, device=DEVICE, dtype=dtype)
    u = act(batch, dim, seqlen)
    delta = act(batch, dim, seqlen) * 0.5 - 1.0
    z = act(batch, dim, seqlen)
    A = -torch.exp(torch.rand(dim, D_STATE, device=DEVICE) * 2)
    B = torch.randn(batch, D_STATE, seqlen, device=DEVICE, dtype=dtype)
    C = torch.randn(batch, D_STATE, seqlen, device=DEVICE, dtype=dtype)
    D = torch.randn(dim, device=DEVICE)
    bias = torch.rand(dim, device=DEVICE) - 4.0
    ins = [u, delta, A, B, C, D, z, bias]
    if requires_grad:
        ins = [t.detach().requires_grad_() for t in ins]
    return ins


def scan_bytes(dim, esize, backward=False):
    bdl, bnl = BATCH * dim * SEQLEN, BATCH * D_STATE * SEQLEN
    fwd = (4 * bdl + 2 * bnl) * esize  # u, delta, z, B, C in; out
    if not backward:
        return fwd
    return fwd + (7 * bdl + 4 * bnl) * esize  # u, delta, z, dout, B, C in; du, ddelta, dz, dB, dC out


def fwd_bwd(fn, ins):
    """Forward and backward; torch.autograd.grad rather than .backward: no accumulation into .grad (whose
    AccumulateGrad nodes, tied to the stream that made them, would break CUDA-graph capture)."""
    leaves = [t for t in ins if t.requires_grad]

    def run():
        out = fn(*ins)
        torch.autograd.grad(out, leaves, grad)
    out = fn(*ins)
    grad = torch.randn_like(out)
    return run


# ----------------------------------------------------------------------------- upstream (own process)
def run_upstream(results):
    import importlib.util
    import types

    import causal_conv1d_cuda  # noqa: F401  (fail early if the build is missing)
    import selective_scan_cuda  # noqa: F401

    # Skip upstream mamba_ssm/__init__.py (it imports the language-model code and transformers).
    spec = importlib.util.find_spec("mamba_ssm")
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["mamba_ssm"] = pkg
    from causal_conv1d import causal_conv1d_fn as up_conv
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as up_scan
    from mamba_ssm.ops.triton.layer_norm import rms_norm_fn as up_norm

    for dname, dtype in DTYPES.items():
        for dim in DIMS:
            ins = scan_inputs(dim, dtype)
            timed(results, f"scan_fwd/{dim}/{dname}/upstream", lambda: up_scan(*ins, delta_softplus=True))
            ins = scan_inputs(dim, dtype, requires_grad=True)
            timed(results, f"scan_fwdbwd/{dim}/{dname}/upstream",
                  fwd_bwd(lambda *a: up_scan(*a, delta_softplus=True), ins))
            # Channel-contiguous inputs (the Vim mixer's in_proj output): upstream copies them first.
            ins = scan_inputs(dim, dtype, channels_last=True)
            timed(results, f"scan_fwd_cl/{dim}/{dname}/upstream", lambda: up_scan(*ins, delta_softplus=True))
            ins = scan_inputs(dim, dtype, channels_last=True, requires_grad=True)
            timed(results, f"scan_fwdbwd_cl/{dim}/{dname}/upstream",
                  fwd_bwd(lambda *a: up_scan(*a, delta_softplus=True), ins))
        conv_and_norm(results, dtype, dname, "upstream", up_conv, up_norm)


def conv_and_norm(results, dtype, dname, tag, conv_fn, norm_fn):
    dim, hidden = S_DIM, HIDDEN
    w = torch.randn(dim, WIDTH, device=DEVICE, dtype=dtype)
    b = torch.randn(dim, device=DEVICE, dtype=dtype)
    for sfx in ("", "_cl"):  # time-contiguous x, and the channel-contiguous view the Vim mixer passes
        x = torch.randn(BATCH, SEQLEN, dim, device=DEVICE, dtype=dtype).transpose(1, 2) if sfx else \
            torch.randn(BATCH, dim, SEQLEN, device=DEVICE, dtype=dtype)
        timed(results, f"conv_fwd{sfx}/{dim}/{dname}/{tag}", lambda: conv_fn(x, w, b, activation="silu"))
        ins = [t.detach().requires_grad_() for t in (x, w, b)]
        timed(results, f"conv_fwdbwd{sfx}/{dim}/{dname}/{tag}", fwd_bwd(lambda *a: conv_fn(*a, activation="silu"), ins))
    h = torch.randn(BATCH * SEQLEN, hidden, device=DEVICE, dtype=dtype)
    res = torch.randn(BATCH * SEQLEN, hidden, device=DEVICE, dtype=torch.float32)
    nw = torch.randn(hidden, device=DEVICE)
    norm = lambda a, r, ww: norm_fn(a, ww, None, residual=r, prenorm=True, residual_in_fp32=True,  # noqa: E731
                                    eps=1e-5)
    timed(results, f"norm_fwd/{hidden}/{dname}/{tag}", lambda: norm(h, res, nw))
    ins = [t.detach().requires_grad_() for t in (h, res, nw)]

    def run():
        out, r = norm(*ins)
        torch.autograd.grad((out, r), ins, (g1, g2))
    out, r = norm(*ins)
    g1, g2 = torch.randn_like(out), torch.randn_like(r)
    del out, r  # a live graph keeps the leaves' AccumulateGrad nodes on this stream: CUDA-graph capture fails
    timed(results, f"norm_fwdbwd/{hidden}/{dname}/{tag}", run)


# ----------------------------------------------------------------------------- ours
def check_ours(checks, lean=False):
    """Full-size agreement with the references (values and gradients), printed and recorded."""
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_op as causal_conv1d_triton, causal_conv1d_ref
    from mamba_ssm.ops.bimamba_interface import ScanWeights, bimamba_v2_inner_ref
    from mamba_ssm.ops.bimamba_stacked import bimamba_v2_inner_stacked as bimamba_v2_inner_triton
    from mamba_ssm.ops.selective_scan_interface import selective_scan_op as selective_scan_triton, selective_scan_ref
    from mamba_ssm.ops.triton.layernorm import layer_norm_ref, layer_norm_triton

    for dname, dtype in DTYPES.items():
        if lean and dname != "fp32":
            break
        for layout in ("cf", "cl"):
            ins = scan_inputs(S_DIM, dtype, channels_last=layout == "cl", requires_grad=True)
            out = selective_scan_triton(*ins, delta_softplus=True)
            ref = selective_scan_ref(*ins, delta_softplus=True)
            g = torch.randn_like(out)
            ga = torch.autograd.grad(out, ins, g)
            gr = torch.autograd.grad(ref, ins, g)
            checks[f"scan/768/{dname}/{layout}"] = {"out": rel(out, ref), **{
                n: rel(a, r) for n, a, r in zip("u delta A B C D z bias".split(), ga, gr)}}
            ins = out = ref = ga = gr = None
            torch.cuda.empty_cache()
        dim, batch = S_DIM, CHECK_BATCH
        mk = lambda: ScanWeights(  # noqa: E731
            torch.randn(dim, 1, WIDTH, device=DEVICE) * 0.3, torch.randn(dim, device=DEVICE) * 0.1,
            torch.randn(24 + 2 * D_STATE, dim, device=DEVICE) * 0.05, torch.randn(dim, 24, device=DEVICE) * 0.2,
            torch.rand(dim, device=DEVICE) - 4.0, -torch.exp(torch.rand(dim, D_STATE, device=DEVICE) * 2),
            torch.randn(dim, device=DEVICE))
        fw, bw = mk(), mk()
        if dtype != torch.float32:
            fw = ScanWeights(*[t.to(dtype) if i < 4 else t for i, t in enumerate(fw)])
            bw = ScanWeights(*[t.to(dtype) if i < 4 else t for i, t in enumerate(bw)])
        xz = torch.randn(batch, SEQLEN, 2 * dim, device=DEVICE, dtype=dtype).transpose(1, 2)
        gate = torch.rand(batch, 2, device=DEVICE)
        gate[: batch // 2, 1] = 0
        mask = (torch.rand(batch, SEQLEN, device=DEVICE) > 0.3).to(dtype)
        leaves = [t.detach().requires_grad_() for t in (xz, gate, *fw, *bw)]
        xz_, gate_ = leaves[0], leaves[1]
        fw_, bw_ = ScanWeights(*leaves[2:9]), ScanWeights(*leaves[9:16])
        out = bimamba_v2_inner_triton(xz_, fw_, bw_, gate_, mask, True)
        ref = bimamba_v2_inner_ref(xz_, fw_, bw_, gate_, mask, True)
        g = torch.randn_like(out)
        ga = torch.autograd.grad(out, leaves, g)
        gr = torch.autograd.grad(ref, leaves, g)
        checks[f"bimamba/768/b16/{dname}"] = {"out": rel(out, ref), "grads_max": max(rel(a, r) for a, r in zip(ga, gr))}
        with torch.no_grad():
            out = bimamba_v2_inner_triton(xz, fw, bw, gate, mask, True)
            ref = bimamba_v2_inner_ref(xz, fw, bw, gate, mask, True)
        checks[f"bimamba_infer/768/b16/{dname}"] = {"out": rel(out, ref)}
        for layout in ("cf", "cl"):
            x = torch.randn(BATCH, SEQLEN, S_DIM, device=DEVICE, dtype=dtype).transpose(1, 2) if layout == "cl" \
                else torch.randn(BATCH, S_DIM, SEQLEN, device=DEVICE, dtype=dtype)
            w = torch.randn(S_DIM, WIDTH, device=DEVICE, dtype=dtype)
            b = torch.randn(S_DIM, device=DEVICE, dtype=dtype)
            ins = [t.requires_grad_() for t in (x, w, b)]
            out, ref = causal_conv1d_triton(*ins, activation="silu"), causal_conv1d_ref(*ins, activation="silu")
            g = torch.randn_like(out)
            checks[f"conv/768/{dname}/{layout}"] = {"out": rel(out, ref), **{n: rel(a, r) for n, a, r in zip(
                "x w b".split(), torch.autograd.grad(out, ins, g), torch.autograd.grad(ref, ins, g))}}
        h = torch.randn(BATCH * SEQLEN, HIDDEN, device=DEVICE, dtype=dtype)
        res = torch.randn(BATCH * SEQLEN, HIDDEN, device=DEVICE)
        nw = torch.randn(HIDDEN, device=DEVICE)
        ins = [t.requires_grad_() for t in (h, res, nw)]
        o1, r1 = layer_norm_triton(ins[0], ins[2], None, ins[1], 1e-5, True, True, True)
        o2, r2 = layer_norm_ref(ins[0], ins[2], None, ins[1], 1e-5, True, True, True)
        g1, g2 = torch.randn_like(o1), torch.randn_like(r1)
        ga = torch.autograd.grad((o1, r1), ins, (g1, g2))
        gr = torch.autograd.grad((o2, r2), ins, (g1, g2))
        checks[f"norm/384/{dname}"] = {"out": rel(o1, o2), "res": rel(r1, r2),
                                       **{n: rel(a, r) for n, a, r in zip("x res w".split(), ga, gr)}}
        torch.cuda.empty_cache()


def run_ours(results, quick=False, lean=False, fwd_only=False):
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_fn
    from mamba_ssm.ops.selective_scan_interface import selective_scan_op as selective_scan_triton, selective_scan_ref
    from mamba_ssm.ops.triton.layernorm import rms_norm_fn
    from mamba_ssm.ops.triton.selective_scan import scan_forward

    src = torch.randn(2 ** 28 if DEVICE == "cuda" else 2 ** 10, device=DEVICE)
    dst = torch.empty_like(src)
    results["copy_TBps"] = 2 * src.numel() * 4 / bench(lambda: dst.copy_(src)) / 1e6
    src = dst = None  # free 2 GB before the scans
    for dname, dtype in DTYPES.items():
        for dim in DIMS:
            ins = scan_inputs(dim, dtype)
            timed(results, f"scan_fwd/{dim}/{dname}/ours", lambda: selective_scan_triton(*ins, delta_softplus=True))
            cl = scan_inputs(dim, dtype, channels_last=True)
            timed(results, f"scan_fwd_cl/{dim}/{dname}/ours", lambda: selective_scan_triton(*cl, delta_softplus=True))
            if (dim == S_DIM or not lean) and not fwd_only:
                for layout in ("cf", "cl"):
                    ins = scan_inputs(dim, dtype, channels_last=layout == "cl", requires_grad=True)
                    timed(results, f"scan_fwdbwd{'_cl' if layout == 'cl' else ''}/{dim}/{dname}/ours",
                          fwd_bwd(lambda *a: selective_scan_triton(*a, delta_softplus=True), ins))
            if dim == S_DIM and dname == "fp32" and not quick:
                ins = scan_inputs(dim, dtype)
                results[f"scan_fwd/{dim}/{dname}/reference"] = bench(
                    lambda: selective_scan_ref(*ins, delta_softplus=True), warmup=5, rep=20)
            if dim == S_DIM:  # the DyVM op: two directions in one launch, channels-last, gates
                u, delta, A, B, C, D, z, bias = scan_inputs(dim, dtype, channels_last=True)
                cl2 = lambda t: torch.stack([t.transpose(1, 2)] * 2).transpose(2, 3)  # noqa: E731  (b, L, d) memory
                u2, d2 = cl2(u), cl2(delta)
                B2, C2 = torch.stack([B, B])[:, :, None], torch.stack([C, C])[:, :, None]
                A2, D2, bias2 = torch.stack([A, A]), torch.stack([D, D]), torch.stack([bias, bias])
                out = torch.empty(BATCH, SEQLEN, dim, device=DEVICE, dtype=dtype).transpose(1, 2)
                for name, on in (("on", 1.0), ("3q", 0.75), ("half", 0.5), ("off", 0.0)):
                    gate = (torch.rand(BATCH, 2, device=DEVICE) < on).float() if on not in (0.0, 1.0) \
                        else torch.full((BATCH, 2), on, device=DEVICE)
                    # a program per direction (the tuned default) and one program running both ("_joint")
                    for split, suffix in ((None, ""), (False, "_joint")):
                        timed(results, f"biscan_fwd_gate_{name}{suffix}/{dim}/{dname}/ours",
                              lambda: scan_forward(u2, d2, A2, B2, C2, D2, z, bias2, True, gate, 0.5, out,
                                                   split_dirs=split))
        if fwd_only:
            continue
        conv_and_norm(results, dtype, dname, "ours", causal_conv1d_fn, rms_norm_fn)
        x = torch.randn(BATCH, S_DIM, SEQLEN, device=DEVICE, dtype=dtype)
        w = torch.randn(S_DIM, 1, WIDTH, device=DEVICE, dtype=dtype)
        b = torch.randn(S_DIM, device=DEVICE, dtype=dtype)
        results[f"conv_fwd/{S_DIM}/{dname}/torch"] = bench(
            lambda: F.silu(F.conv1d(x, w, b, padding=WIDTH - 1, groups=S_DIM)[..., :SEQLEN]))


class Results(dict):
    """Prints each timing as it lands (a device call can be cut off at its time limit)."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        print(f"{key:<44}{value:10.1f}", flush=True)


# (block_d, num_warps, unroll, lanes_on_channels, prefetch); prefetch walks in groups of 4 (unroll unused)
FWD_SWEEP = ((32, 1, 2, True, False), (32, 1, 4, True, False), (16, 1, 4, True, False), (8, 1, 4, True, False),
             (64, 2, 2, True, False), (32, 2, 8, False, False), (32, 1, 8, False, False), (64, 2, 4, False, False),
             (32, 1, 4, True, True), (16, 1, 4, True, True), (64, 2, 4, True, True), (32, 1, 4, False, True),
             (32, 2, 4, False, True), (64, 2, 4, False, True))
# (block_d, num_warps, prefetch, sub_chunk, scratch_evict, maxnreg): sub_chunk steps recomputed into the scratch at a
# time; maxnreg caps the registers per thread (0: none)
BWD_SWEEP = ((32, 1, False, 16, "", 0), (32, 1, True, 16, "", 0), (32, 1, True, 8, "", 0),
             (32, 1, True, 8, "evict_last", 0), (32, 1, True, 4, "evict_last", 0), (16, 1, True, 8, "evict_last", 0),
             (64, 2, True, 8, "evict_last", 0), (32, 1, True, 8, "evict_last", 168))
CONV_SWEEP = ((32, 64, 4), (64, 32, 4), (64, 64, 4), (128, 32, 4), (256, 16, 4), (32, 128, 4), (16, 128, 4),
              (8, 256, 4), (64, 128, 8))
CONV_BWD_SWEEP = {  # (block_t, block_d, num_warps); channel-contiguous: the walk kernel (block_t unused)
    "cf": ((256, 4, 2), (256, 8, 4), (256, 16, 4), (128, 16, 4), (256, 4, 1), (256, 2, 1), (128, 2, 1)),
    "cl": ((4, 32, 1), (4, 64, 2), (4, 128, 4), (4, 256, 8)),
}


def sweep(results, lean=False, ops=("scan", "conv")):
    """Launch parameters of the kernels at Vim-S (d_inner 768), per input layout and dtype; sets the fastest
    as the defaults used by everything timed afterwards (and returns them: --save-tuning writes them for
    MAMBA_TRITON_TUNING). Forward configurations are (block_d, num_warps, unroll, lanes_on_channels, prefetch);
    backward ones (block_d, num_warps, prefetch, sub_chunk, scratch_evict, maxnreg), timed from the forward's
    checkpoints (the backward kernel alone, one direction, channel-contiguous inputs: time-contiguous ones are
    copied to that layout first; benchmarks/scan_train_tuning.py times both directions at training shapes);
    conv ones (block_t, block_d, num_warps), fp32, forward and backward kernel."""
    timings = {}

    def record(name, kind, key, cfg, t, got, want, dtype):
        """A configuration counts only if its results agree with the reference: the compiler can get one
        configuration wrong and not another (see the conv walk kernel's workaround)."""
        tol = 1e-3 if dtype == torch.float32 else 3e-2
        errs = [rel(a, b) for a, b in zip(got, want)]
        if max(errs) > tol:
            print(f"{name}: WRONG RESULTS (relative errors {['%.1e' % e for e in errs]}), not a candidate",
                  flush=True)
            t = float("nan")
        else:
            timings[(kind, key, cfg)] = t
        results[name] = t

    for dname, dtype in DTYPES.items():
        for layout in ("cf", "cl") if {"scan", "scan_bwd"} & set(ops) else ():
            _sweep_scan(record, dname, dtype, layout, ops, lean)
    for layout in ("cf", "cl") if "conv" in ops else ():
        _sweep_conv(record, layout)
    return _take_fastest(timings, ops, lean)


def _sweep_scan(record, dname, dtype, layout, ops, lean):
    """The scan's forward configurations (FWD_SWEEP) and, for channel-contiguous inputs, its backward ones
    (BWD_SWEEP), each checked against selective_scan_ref."""
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref
    from mamba_ssm.ops.triton import selective_scan as ss

    u, delta, A, B, C, D, z, bias = scan_inputs(S_DIM, dtype, channels_last=layout == "cl")
    key = ss._tuning_key(u)
    out = torch.empty_like(u)
    args = (u[None], delta[None], A[None], B[None, :, None], C[None, :, None], D[None], z, bias[None],
            True, None, 1.0)
    want = [selective_scan_ref(u, delta, A, B, C, D, z, bias, delta_softplus=True)]
    for cfg in FWD_SWEEP if "scan" in ops else ():
        t = bench(lambda: ss.scan_forward(*args, out, block_d=cfg[0], num_warps=cfg[1], unroll=cfg[2],
                                          lanes_on_channels=cfg[3], prefetch=cfg[4]))
        record(f"sweep_fwd/{layout}/{dname}/bd{cfg[0]}_w{cfg[1]}_u{cfg[2]}_{'lanes' if cfg[3] else 'tile'}"
               f"{'_prefetch' if cfg[4] else ''}",
               "fwd", key, cfg, t, [out], want, dtype)
    if lean or layout == "cf":
        return
    dout = torch.randn_like(u)
    _, ckpt = ss.scan_forward(*args, out, want_ckpt=True)
    n = 4  # the reference's backward on a few samples (the kernels treat samples alike)
    leaves = [t[:n].detach().float().requires_grad_() for t in (u, delta, B, C, z)]
    ref = selective_scan_ref(leaves[0], leaves[1], A, leaves[2], leaves[3], D, leaves[4], bias, delta_softplus=True)
    want = torch.autograd.grad(ref, leaves, dout[:n].float())
    for cfg in BWD_SWEEP:
        call = lambda: ss.scan_backward(*args, dout, ckpt=ckpt, block_d=cfg[0], num_warps=cfg[1],  # noqa
                                        prefetch=cfg[2], sub_chunk=cfg[3], scratch_evict=cfg[4], maxnreg=cfg[5])
        t = bench(call)
        g = call()
        got = [g["du"][0, :n], g["ddelta"][0, :n], g["dB"][0, :n, 0], g["dC"][0, :n, 0], g["dz"][:n]]
        record(f"sweep_bwd/{layout}/{dname}/bd{cfg[0]}_w{cfg[1]}{'_prefetch' if cfg[2] else ''}_sub{cfg[3]}"
               f"{'_' + cfg[4] if cfg[4] else ''}{f'_r{cfg[5]}' if cfg[5] else ''}", "bwd", key, cfg, t, got,
               want, dtype)


def _sweep_conv(record, layout):
    """The conv forward (+SiLU) and backward kernel configurations, d_inner 768, fp32, against _stacked_ref."""
    from causal_conv1d import triton_causal_conv1d as tc
    from causal_conv1d.conv_op import _stacked_ref

    x = scan_inputs(S_DIM, torch.float32, channels_last=layout == "cl")[0]
    w, b = torch.randn(1, S_DIM, WIDTH, device=DEVICE), torch.randn(1, S_DIM, device=DEVICE)
    out = torch.empty_like(x)[None]
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    ref = _stacked_ref(*leaves, None, True)
    for cfg in CONV_SWEEP:
        t = bench(lambda: tc.conv_forward(x, w, b, None, True, out, block_t=cfg[0], block_d=cfg[1], num_warps=cfg[2]))
        record(f"sweep_conv/{layout}/fp32/bt{cfg[0]}_bd{cfg[1]}_w{cfg[2]}", "conv", layout, cfg, t, [out], [ref],
               torch.float32)
    dout = torch.randn_like(out)
    want = torch.autograd.grad(ref, leaves, dout)
    for cfg in CONV_BWD_SWEEP[layout]:  # the backward kernel alone
        call = lambda: tc.conv_backward(x, w, b, None, True, dout, block_t=cfg[0], block_d=cfg[1],  # noqa
                                        num_warps=cfg[2])
        t = bench(call)
        record(f"sweep_conv_bwd/{layout}/fp32/bt{cfg[0]}_bd{cfg[1]}_w{cfg[2]}", "conv", layout + "_bwd", cfg, t,
               call(), want, torch.float32)


def _take_fastest(timings, ops, lean) -> dict:
    """Sets each tuning table's entries to the fastest correct configuration swept; returns the tables."""
    from causal_conv1d import triton_causal_conv1d as tc
    from mamba_ssm.ops.triton import selective_scan as ss

    def best(kind, key):
        return min((v, k[2]) for k, v in timings.items() if k[:2] == (kind, key))[1]

    for key in ss.FWD_TUNING if "scan" in ops else ():  # (split_dirs is not swept: biscan rows time it)
        c = best("fwd", key)
        ss.FWD_TUNING[key] = {**ss.FWD_TUNING[key], "block_d": c[0], "num_warps": c[1], "unroll": c[2],
                              "lanes_on_channels": c[3], "prefetch": c[4]}
    for key in ss.BWD_TUNING if {"scan", "scan_bwd"} & set(ops) and not lean else ():
        c = best("bwd", key)
        ss.BWD_TUNING[key] = {**ss.BWD_TUNING[key], "block_d": c[0], "num_warps": c[1], "prefetch": c[2],
                              "sub_chunk": c[3], "scratch_evict": c[4], "maxnreg": c[5]}
    for layout in tc.CONV_TUNING if "conv" in ops else ():
        c = best("conv", layout)
        tc.CONV_TUNING[layout] = {"block_t": c[0], "block_d": c[1], "num_warps": c[2]}
    tuning = {"fwd": {k: dict(v) for k, v in ss.FWD_TUNING.items()},
              "bwd": {k: dict(v) for k, v in ss.BWD_TUNING.items()},
              "conv": {k: dict(v) for k, v in tc.CONV_TUNING.items()}}
    print("tuning used below:", json.dumps(tuning), flush=True)
    return tuning


def table(results):
    copy = results.get("copy_TBps", float("nan"))
    rows = [f"copy bandwidth {copy:.2f} TB/s (device-to-device, read + write); eager calls, then CUDA-graph "
            "replays (GPU time without the host)",
            f"{'op':<22}{'shape':>6}{'dtype':>6}{'ours us':>10}{'upstr us':>10}{'speed-up':>9}{'ours TB/s':>10}"
            f"{'graph ours':>11}{'graph up':>10}{'speed-up':>9}"]
    keys = sorted({k.rsplit('/', 1)[0] for k in results if "/" in k and not k.startswith("sweep")})
    for key in keys:
        op, shape, dname = key.split("/")
        ours, up = results.get(key + "/ours"), results.get(key + "/upstream")
        esize = 4 if dname == "fp32" else 2
        bw = ""
        if ours and op.startswith("scan_"):
            bw = f"{scan_bytes(int(shape), esize, op.startswith('scan_fwdbwd')) / ours / 1e6:.2f}"
        speed = f"{up / ours:.2f}x" if ours and up else ""
        g_ours, g_up = results.get(key + "/ours_graph"), results.get(key + "/upstream_graph")
        g_speed = f"{g_up / g_ours:.2f}x" if g_ours and g_up else ""
        graph = f"{g_ours or float('nan'):>11.1f}{g_up or float('nan'):>10.1f}{g_speed:>9}" if g_ours or g_up else ""
        rows.append(f"{op:<22}{shape:>6}{dname:>6}{ours or float('nan'):>10.1f}{up or float('nan'):>10.1f}"
                    f"{speed:>9}{bw:>10}{graph}")
        if key + "/reference" in results:
            rows.append(f"{'  reference (torch)':<34}{results[key + '/reference']:>10.1f}")
        if key + "/torch" in results:
            rows.append(f"{'  torch conv1d+silu':<34}{results[key + '/torch']:>10.1f}")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="kernel_bench.json")
    p.add_argument("--upstream-only", action="store_true", help="time the upstream kernels only")
    p.add_argument("--merge", nargs="*", default=[], help="JSON results to merge into the table")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--table-only", action="store_true", help="only merge --merge files and print the table")
    p.add_argument("--quick", action="store_true", help="skip the slow reference timing")
    p.add_argument("--sweep", action="store_true", help="first sweep the scan kernels' launch parameters")
    p.add_argument("--fwd-only", action="store_true", help="scan forward only: full-size checks and timings")
    p.add_argument("--sweep-only", action="store_true", help="sweep, check the scan forward at full size, stop")
    p.add_argument("--sweep-ops", nargs="+", choices=("scan", "scan_bwd", "conv"), default=["scan", "conv"],
                   help="which kernels --sweep tunes (the others keep their tables or MAMBA_TRITON_TUNING's); "
                        "scan: the scan's forward and backward, scan_bwd: its backward only")
    p.add_argument("--lean", action="store_true", help="fewer checks, sweeps and backward timings (short device calls)")
    p.add_argument("--save-tuning", default="", metavar="JSON",
                   help="with --sweep: write the chosen launch parameters here (use with MAMBA_TRITON_TUNING)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, Triton interpreter, tiny shapes, meaningless timings: tests the script itself")
    args = p.parse_args()
    if args.dry_run:
        dry_run_setup()
        from mamba_ssm.ops.dispatch import triton_on_cpu

        with triton_on_cpu():
            return run(args)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU (or --dry-run)")
    run(args)


def run(args):
    torch.manual_seed(0)
    results, checks = Results(), {}
    card = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"
    meta = {"card": card, "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv)}
    if args.upstream_only:
        run_upstream(results)
    elif not args.table_only:
        if args.sweep or args.sweep_only:  # first, so that the checks below run the kernels as timed
            meta["tuning"] = sweep(results, args.lean, args.sweep_ops)
            if args.save_tuning:
                json.dump(meta["tuning"], open(args.save_tuning, "w"), indent=1)
        if args.sweep_only or args.fwd_only:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_op as selective_scan_triton
            from mamba_ssm.ops.selective_scan_interface import selective_scan_ref
            for dname, dtype in DTYPES.items():
                for layout in (False, True):
                    ins = scan_inputs(S_DIM, dtype, channels_last=layout)
                    out, last = selective_scan_triton(*ins, delta_softplus=True, return_last_state=True)
                    ref, lref = selective_scan_ref(*ins, delta_softplus=True, return_last_state=True)
                    checks[f"scan_fwd/768/{dname}/{'cl' if layout else 'cf'}"] = [rel(out, ref), rel(last, lref)]
                    if args.sweep_only:
                        results[f"scan_fwd{'_cl' if layout else ''}/768/{dname}/ours"] = bench(
                            lambda: selective_scan_triton(*ins, delta_softplus=True))
            print(json.dumps(checks), flush=True)
        if not args.skip_check and not args.sweep_only and not args.fwd_only:
            try:
                check_ours(checks, args.lean)
            except Exception as e:  # keep timing; the failure is recorded and printed
                if args.dry_run:
                    raise
                import traceback
                traceback.print_exc()
                checks["error"] = repr(e)
            print(json.dumps(checks), flush=True)
        if not args.sweep_only:
            run_ours(results, args.quick or args.lean or args.fwd_only, args.lean, args.fwd_only)
    for path in args.merge:
        if os.path.exists(path):
            saved = json.load(open(path))
            results.update(saved["results"])
            checks.update(saved["checks"])
    json.dump({"meta": meta, "checks": checks, "results": results}, open(args.out, "w"), indent=1)
    print(meta)
    print(table(results))


if __name__ == "__main__":
    main()
