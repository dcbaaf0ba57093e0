"""The CPU implementations of the stacked scan and conv ops (mamba_ssm/ops/cpu/selective_scan.py,
causal_conv1d/cpu_causal_conv1d.py) against the straightforward formulas, written here as plain loops over
time and taps with autograd: values and every gradient, fp64 (to rounding) and fp32, one and two
directions, gates, D / z / bias / softplus on and off, grouped and fixed B, lengths across chunk edges."""
import os

import pytest
import torch
import torch.nn.functional as F

from causal_conv1d import cpu_causal_conv1d as cpu_conv
from mamba_ssm.ops.cpu import selective_scan as cpu_scan

TOL = {torch.float64: 1e-11, torch.float32: 2e-5}
GRAD_NAMES = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias", "dgate")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def scan_by_steps(u, delta, A, B, C, D, z, delta_bias, gate, softplus, scale):
    """The stacked op's definition, one direction and one step at a time (direction 1 walks time backwards)."""
    R, batch, dim, seqlen = u.shape
    groups = B.shape[2]
    out, lasts = 0, []
    for r in range(R):
        dt = delta[r] + (delta_bias[r][:, None] if delta_bias is not None else 0)
        dt = F.softplus(dt) if softplus else dt
        h = u.new_zeros(batch, dim, A.shape[-1])
        ys = [None] * seqlen
        for t in (reversed(range(seqlen)) if r == 1 else range(seqlen)):
            Bt = B[r, :, :, :, t].repeat_interleave(dim // groups, dim=1)  # (b, d, N)
            Ct = C[r, :, :, :, t].repeat_interleave(dim // C.shape[2], dim=1)
            h = torch.exp(dt[:, :, t, None] * A[r]) * h + (dt[:, :, t] * u[r, :, :, t])[..., None] * Bt
            ys[t] = (h * Ct).sum(-1)
        y = torch.stack(ys, -1)
        if D is not None:
            y = y + D[r][:, None] * u[r]
        if z is not None:
            y = y * F.silu(z)
        w = scale if gate is None else gate[:, r, None, None] * scale
        out = out + y * w
        lasts.append(h)
    return out, torch.stack(lasts)


def scan_case(R, batch, dim, seqlen, d_state, dtype, groups=1, full=True, fixed_B=False):
    g = torch.Generator().manual_seed(seqlen * 100 + R * 10 + groups)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    u = rnd(R, batch, seqlen, dim).transpose(2, 3)  # the mixer's channel-contiguous layout
    delta = 0.5 * rnd(R, batch, dim, seqlen)
    A = -torch.rand(R, dim, d_state, generator=g, dtype=dtype) - 0.5
    if fixed_B:  # a (dim, N) B: one group per channel
        B = rnd(R, dim, d_state)[:, None, :, :, None].expand(R, batch, dim, d_state, seqlen)
    else:
        B = rnd(R, batch, groups, d_state, seqlen)
    C = rnd(R, batch, seqlen, 1, d_state).permute(0, 1, 3, 4, 2)  # strided, as x_proj's output gives it
    D = rnd(R, dim) if full else None
    z = rnd(batch, seqlen, dim).transpose(1, 2) if full else None
    bias = 0.3 * rnd(R, dim) if full else None
    gate = (torch.tensor([[1.0, 0.0], [0.7, 1.3], [0.0, 0.0]], dtype=dtype)[:batch, :R] if full else None)
    return [t.detach().requires_grad_() if t is not None else None for t in (u, delta, A, B, C, D, z, bias, gate)]


@pytest.mark.parametrize("R,seqlen,dtype,groups,full,fixed_B", [
    (2, 37, torch.float64, 1, True, False),   # chunk edges inside the sequence, both directions, every option
    (1, 23, torch.float64, 1, False, False),  # one direction, no D / z / bias / softplus / gate
    (2, 20, torch.float64, 2, True, False),   # B and C in 2 groups of channels
    (1, 9, torch.float64, 1, True, True),     # fixed (dim, N) B: a group per channel
    (2, 1, torch.float64, 1, True, False),    # a single step
    (2, 50, torch.float32, 1, True, False),
])
def test_cpu_scan_matches_step_loop(R, seqlen, dtype, groups, full, fixed_B):
    inputs = scan_case(R, 3, 8, seqlen, 4, dtype, groups, full, fixed_B)
    u, delta, A, B, C, D, z, bias, gate = inputs
    softplus, scale = full, 0.5
    ref, ref_last = scan_by_steps(*inputs, softplus, scale)
    dout, dlast = torch.randn_like(ref), torch.randn_like(ref_last)
    wrt = [t for t in inputs if t is not None]
    want = torch.autograd.grad([ref, ref_last], wrt, [dout, dlast])
    before = [t.detach().clone() for t in inputs if t is not None]
    with torch.no_grad():
        out = torch.empty_like(ref)
        last, ckpt = cpu_scan.scan_forward(u, delta, A, B, C, D, z, bias, softplus, gate, scale, out, True, True)
        got = cpu_scan.scan_backward(u, delta, A, B, C, D, z, bias, softplus, gate, scale, dout, dlast, ckpt)
    assert out.dtype == dtype and got["du"].dtype == dtype
    assert rel(out, ref) < TOL[dtype] and rel(last, ref_last) < TOL[dtype]
    names = [n for n, t in zip(GRAD_NAMES, inputs) if t is not None]
    for name, w in zip(names, want):
        assert got[name].shape == w.shape, name
        assert rel(got[name], w) < TOL[dtype], f"{name}: relative error {rel(got[name], w):.2e}"
    # without the forward's checkpoint the backward recomputes it: the same gradients
    with torch.no_grad():
        again = cpu_scan.scan_backward(u, delta, A, B, C, D, z, bias, softplus, gate, scale, dout, dlast)
    assert all(torch.equal(again[n], got[n]) for n in names)
    assert all(torch.equal(a, b) for a, b in zip(before, [t for t in inputs if t is not None]))  # inputs untouched


def test_cpu_scan_gated_off_sample_ignores_its_inputs():
    """A (sample, direction) whose gate is exactly 0 contributes 0 even when its inputs are not finite."""
    u, delta, A, B, C, D, z, bias, _ = scan_case(2, 2, 8, 11, 4, torch.float32)
    gate = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    u = u.detach().clone()
    u[1] = float("nan")
    out = torch.empty(2, 8, 11)
    with torch.no_grad():
        cpu_scan.scan_forward(u, delta, A, B, C, D, z, bias, True, gate, 1.0, out)
    assert torch.isfinite(out[0]).all() and torch.equal(out[1], torch.zeros_like(out[1]))


def test_cpu_softplus_is_exact():
    """To rounding: exp(-|x|) is computed as exp2(-|x| log2(e)), whose product rounds to a relative error of
    |x| ulps in the result (the Triton kernels' exp2 does the same); no loss where exp(x) is tiny."""
    x = torch.cat([torch.linspace(-80, 40, 20001, dtype=torch.float64), torch.tensor([0.0, 1e-20, -1e-20])])
    for dtype, eps in ((torch.float64, 2.2e-16), (torch.float32, 1.2e-7)):
        xd = x.to(dtype)
        want = torch.log1p(torch.exp(xd.double()))  # no overflow in this range
        got = cpu_scan.softplus(xd).double()
        assert ((got - want).abs() / want <= 4 * eps * (1 + xd.double().abs())).all()


def conv_by_taps(x, weight, bias, mask, silu):
    """out[r] = m * act(bias + sum_k w[r, :, k] x_m[t - K + 1 + k]) for r = 0; x_m[t + K - 1 - k] for r = 1."""
    R, dim, width = weight.shape
    seqlen = x.shape[-1]
    xm = x if mask is None else x * mask[:, None]
    outs = []
    for r in range(R):
        taps = []
        for t in range(seqlen):
            acc = bias[r] if bias is not None else torch.zeros_like(xm[:, :, 0])
            for k in range(width):
                src = t - (width - 1) + k if r == 0 else t + (width - 1) - k
                if 0 <= src < seqlen:
                    acc = acc + weight[r, :, k] * xm[:, :, src]
            taps.append(acc)
        y = torch.stack(taps, -1)
        y = F.silu(y) if silu else y
        outs.append(y if mask is None else y * mask[:, None])
    return torch.stack(outs)


@pytest.mark.parametrize("R,width,seqlen,masked,silu,channels_last,dtype", [
    (2, 4, 19, True, True, True, torch.float64),
    (2, 4, 19, True, True, False, torch.float64),
    (1, 3, 12, False, True, True, torch.float64),
    (2, 2, 7, False, False, False, torch.float64),
    (2, 4, 1, True, True, True, torch.float64),
    (2, 4, 50, True, True, True, torch.float32),
])
def test_cpu_conv_matches_tap_sum(R, width, seqlen, masked, silu, channels_last, dtype):
    batch, dim = 2, 12
    x = torch.randn(batch, seqlen, dim, dtype=dtype).transpose(1, 2) if channels_last else \
        torch.randn(batch, dim, seqlen, dtype=dtype)
    weight, bias = torch.randn(R, dim, width, dtype=dtype), torch.randn(R, dim, dtype=dtype)
    mask = (torch.rand(batch, seqlen) > 0.3).to(dtype) if masked else None
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    ref = conv_by_taps(*leaves, mask, silu)
    dout = torch.randn_like(ref)
    want = torch.autograd.grad(ref, leaves, dout)
    out = cpu_conv.conv_forward(x, weight, bias, mask, silu, torch.empty_like(ref))
    dx, dw, db, dmask = cpu_conv.conv_backward(x, weight, bias, mask, silu, dout)
    assert dx.dtype == dtype and dx.shape == x.shape and dmask is None  # dmask only when asked for
    for name, a, b in zip(("out", "dx", "dweight", "dbias"), (out, dx, dw, db), (ref, *want)):
        assert rel(a, b) < TOL[dtype], f"{name}: relative error {rel(a, b):.2e}"
    _, dw_nobias, db_none, _ = cpu_conv.conv_backward(x, weight, None, mask, silu, dout)
    assert db_none is None and dw_nobias.shape == dw.shape


def _grads(out, inputs, g):
    return torch.autograd.grad(out, [t for t in inputs if t is not None and t.requires_grad], g)


@pytest.mark.parametrize("dtype,gated,masked", [(torch.float64, True, True), (torch.float64, False, False),
                                                (torch.float32, True, True)])
def test_public_ops_on_cpu_match_the_references(dtype, gated, masked):
    """bimamba_v2_inner_fn, selective_scan_fn and causal_conv1d_fn on CPU (the stacked ops on these
    implementations) against bimamba_v2_inner_ref / selective_scan_ref / causal_conv1d_ref: values and every
    gradient, including the gates'."""
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_ref
    from mamba_ssm.ops.bimamba_interface import ScanWeights, bimamba_v2_inner_fn, bimamba_v2_inner_ref
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn, selective_scan_ref

    tol = 1e-9 if dtype == torch.float64 else 2e-5  # the references round the directions' sum in fp32
    batch, dim, seqlen, d_state, dt_rank = 3, 16, 21, 4, 2

    def weights():
        return ScanWeights(0.5 * torch.randn(dim, 1, 4, dtype=dtype), 0.1 * torch.randn(dim, dtype=dtype),
                           0.2 * torch.randn(dt_rank + 2 * d_state, dim, dtype=dtype),
                           0.3 * torch.randn(dim, dt_rank, dtype=dtype), 0.3 * torch.randn(dim, dtype=dtype) - 1,
                           -torch.rand(dim, d_state, dtype=dtype) - 0.5, torch.randn(dim, dtype=dtype))
    xz = torch.randn(batch, seqlen, 2 * dim, dtype=dtype).transpose(1, 2)  # in_proj's layout
    leaves = [t.detach().requires_grad_() for t in (xz, *weights(), *weights())]
    gate = torch.tensor([[1.0, 0.0], [0.7, 1.3], [0.0, 0.0]], dtype=dtype).requires_grad_() if gated else None
    # a training mask carries the pruning decisions' straight-through gradient
    mask = (torch.rand(batch, seqlen) > 0.3).to(dtype).requires_grad_() if masked else None
    args = (leaves[0], ScanWeights(*leaves[1:8]), ScanWeights(*leaves[8:15]), gate, mask)
    out, ref = bimamba_v2_inner_fn(*args), bimamba_v2_inner_ref(*args)
    g = torch.randn_like(out)
    inputs = [*leaves, gate, mask]
    for name, a, b in zip(["out", "xz", *ScanWeights._fields * 2, "gate", "mask"],
                          [out, *_grads(out, inputs, g)], [ref, *_grads(ref, inputs, g)]):
        assert rel(a, b) < tol, f"bimamba {name}: {rel(a, b):.2e}"

    u, delta, z = (torch.randn(2, dim, seqlen, dtype=dtype, requires_grad=True) for _ in range(3))
    A = (-torch.rand(dim, d_state, dtype=dtype) - 0.5).requires_grad_()
    B, C = (torch.randn(2, d_state, seqlen, dtype=dtype, requires_grad=True) for _ in range(2))
    D, bias = torch.randn(dim, dtype=dtype, requires_grad=True), torch.randn(dim, dtype=dtype, requires_grad=True)
    inputs = (u, delta, A, B, C, D, z, bias)
    out, last = selective_scan_fn(*inputs, delta_softplus=True, return_last_state=True)
    ref, ref_last = selective_scan_ref(*inputs, delta_softplus=True, return_last_state=True)
    g = torch.randn_like(out)
    assert rel(last, ref_last) < tol
    for a, b in zip([out, *_grads(out, inputs, g)], [ref, *_grads(ref, inputs, g)]):
        assert rel(a, b) < tol

    x, w, b = (torch.randn(*s, dtype=dtype, requires_grad=True) for s in ((2, dim, seqlen), (dim, 4), (dim,)))
    out, ref = causal_conv1d_fn(x, w, b, activation="silu"), causal_conv1d_ref(x, w, b, activation="silu")
    g = torch.randn_like(out)
    for a, c in zip([out, *_grads(out, (x, w, b), g)], [ref, *_grads(ref, (x, w, b), g)]):
        assert rel(a, c) < tol


@pytest.mark.parametrize("is_rms,residual,prenorm,res_fp32,dtype", [
    (True, True, True, True, torch.float32),
    (True, False, True, True, torch.float32),   # the first layer: residual_out is the input itself
    (True, True, False, False, torch.bfloat16),
    (False, True, True, False, torch.float32),
    (False, False, False, False, torch.float32),
])
def test_cpu_add_norm_matches_reference(is_rms, residual, prenorm, res_fp32, dtype):
    """layer_norm_fn on CPU with a gradient (the analytic FusedAddNorm) against layer_norm_ref: values, dtypes
    and the gradients of x, residual, weight and bias, with and without the residual_out output's gradient."""
    from mamba_ssm.ops.triton.layernorm import layer_norm_fn, layer_norm_ref

    x = torch.randn(3, 5, 48, dtype=dtype)
    res = torch.randn(3, 5, 48) if residual else None
    w, b = torch.randn(48), None if is_rms else torch.randn(48)
    inputs = [t.requires_grad_() if t is not None else None for t in (x, res, w, b)]
    args = (inputs[0], inputs[2], inputs[3], inputs[1], 1e-5, prenorm, res_fp32, is_rms)
    outs, refs = layer_norm_fn(*args), layer_norm_ref(*args)
    outs, refs = (outs, refs) if prenorm else ((outs,), (refs,))
    assert type(outs[0].grad_fn).__name__.startswith("FusedAddNorm")
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for o, r in zip(outs, refs):
        assert o.dtype == r.dtype and rel(o, r) < tol
    wrt = [t for t in inputs if t is not None]
    for used in (outs, outs[:1]):  # with and without residual_out in the loss
        gs = [torch.randn_like(o) for o in used]
        got = torch.autograd.grad(used, wrt, gs, retain_graph=True)
        for a, c in zip(got, torch.autograd.grad(refs[:len(used)], wrt, gs, retain_graph=True)):
            assert a.dtype == c.dtype and rel(a, c) < tol


def test_cpu_ops_pass_gradcheck():
    """torch.autograd.gradcheck (finite differences, fp64) of the public ops on the CPU implementations:
    bimamba_v2_inner_fn with gates and a token mask that needs a gradient, and selective_scan_fn with every
    option and the last state."""
    from mamba_ssm.ops.bimamba_interface import ScanWeights, bimamba_v2_inner_fn
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    dim, seqlen, d_state, dt_rank = 4, 6, 2, 1

    def weights():
        return [0.5 * rnd(dim, 1, 4), 0.1 * rnd(dim), 0.2 * rnd(dt_rank + 2 * d_state, dim), 0.3 * rnd(dim, dt_rank),
                0.3 * rnd(dim) - 1, -torch.rand(dim, d_state, generator=g, dtype=torch.float64) - 0.5, rnd(dim)]
    mask = (torch.rand(2, seqlen, generator=g) > 0.3).double()
    inputs = [rnd(2, seqlen, 2 * dim).transpose(1, 2), *weights(), *weights(),
              torch.tensor([[1.0, 0.5], [0.7, 1.3]], dtype=torch.float64), mask]
    inputs = [t.requires_grad_() for t in inputs]

    def bimamba(xz, *rest):
        return bimamba_v2_inner_fn(xz, ScanWeights(*rest[:7]), ScanWeights(*rest[7:14]), rest[14], rest[15])
    assert torch.autograd.gradcheck(bimamba, inputs, eps=1e-6, atol=1e-5)

    u, delta, z, B, C = (rnd(2, *s).requires_grad_() for s in ((3, 9), (3, 9), (3, 9), (2, 9), (2, 9)))
    A = (-torch.rand(3, 2, generator=g, dtype=torch.float64) - 0.5).requires_grad_()
    D, bias = rnd(3).requires_grad_(), rnd(3).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: selective_scan_fn(*a, delta_softplus=True, return_last_state=True),
                                    (u, delta, A, B, C, D, z, bias))


def test_cpu_step_benchmark_runs(tmp_path, capsys):
    """benchmarks/cpu_step.py end to end at its smallest (one step of the demo's dense model on both paths)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[2] / "benchmarks" / "cpu_step.py"
    spec = importlib.util.spec_from_file_location("cpu_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "result.txt"
    cwd = os.getcwd()
    try:
        assert module.main(["--configs", "dense", "--rounds", "1", "--steps", "1", "--out", str(out)]) == 0
    finally:
        os.chdir(cwd)
    text = out.read_text()
    assert "dense    impl" in text and "dense    ref" in text and "faster on the implementations" in text
