"""The Triton kernels on CPU through the Triton interpreter, against the PyTorch references.

Values and every gradient, fp32 and bf16 tolerances, gates on and off, token masks, lengths 1 / 50 / 197,
more than one block of channels (d = 40 with 32-channel blocks). Kernels run on CPU tensors inside
`triton_on_cpu()`; TRITON_INTERPRET must be set before the kernel modules are imported.
"""
import importlib
import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"
for _name in ("causal_conv1d.triton_causal_conv1d", "mamba_ssm.ops.triton.selective_scan",
              "mamba_ssm.ops.triton.layernorm_kernel"):
    if _name in sys.modules:  # imported before the variable was set: re-decorate the kernels
        importlib.reload(sys.modules[_name])

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from causal_conv1d.causal_conv1d_interface import causal_conv1d_fn, causal_conv1d_ref  # noqa: E402
from causal_conv1d.conv_op import conv_macs  # noqa: E402
from mamba_ssm.ops.bimamba_interface import ScanWeights, bimamba_v2_inner_fn, bimamba_v2_inner_ref  # noqa: E402
from mamba_ssm.ops.dispatch import FORCE_REFERENCE_ENV, triton_enabled, triton_on_cpu  # noqa: E402
from mamba_ssm.ops.scan_op import scan_macs  # noqa: E402
from mamba_ssm.ops.selective_scan_interface import selective_scan_fn, selective_scan_ref  # noqa: E402
from mamba_ssm.ops.triton.layernorm import layer_norm_ref, layer_norm_triton  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative L2 error (see benchmarks for full-size numbers)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def grads(out, inputs, g):
    tensors = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(out, tensors, g)


def assert_close_all(outs, refs, dtype, names):
    for name, a, r in zip(names, outs, refs):
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        assert rel(a, r) < TOL[dtype], f"{name}: relative error {rel(a, r):.2e}"


def scan_inputs(batch, dim, seqlen, d_state, dtype, b_layout="var", groups=1):
    u = torch.randn(batch, dim, seqlen, dtype=dtype)
    delta = (0.5 * torch.randn(batch, dim, seqlen)).to(dtype)
    A = -torch.rand(dim, d_state) - 0.5
    if b_layout == "fixed":
        B = torch.randn(dim, d_state)
    elif groups > 1:
        B = torch.randn(batch, groups, d_state, seqlen, dtype=dtype)
    else:
        B = torch.randn(batch, d_state, seqlen, dtype=dtype)
    C = torch.randn(batch, d_state, seqlen, dtype=dtype)
    D = torch.randn(dim)
    z = torch.randn(batch, dim, seqlen, dtype=dtype)
    bias = 0.3 * torch.randn(dim)
    return [t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]


@pytest.mark.parametrize("dtype,seqlen,options", [
    (torch.float32, 50, "all"),
    (torch.bfloat16, 50, "all"),
    (torch.float32, 1, "all"),
    (torch.float32, 197, "all"),
    (torch.float32, 23, "bare"),          # no D, z, delta_bias, softplus
    (torch.float32, 23, "fixed_B"),       # B (dim, N), as selective_scan_fn allows
    (torch.float32, 23, "groups"),        # B with 2 groups, C with 1
    (torch.bfloat16, 50, "channels_last"),  # u, delta, z with channel-contiguous memory (the Vim mixer's)
    (torch.float32, 37, "channels_last"),   # ... at fp32 tolerance; the output keeps u's layout
])
def test_selective_scan_matches_reference(dtype, seqlen, options):
    batch, dim = (1, 40) if seqlen == 197 else (2, 40)
    layout = "fixed" if options == "fixed_B" else "var"
    u, delta, A, B, C, D, z, bias = scan_inputs(batch, dim, seqlen, 8, dtype, layout, 2 if options == "groups" else 1)
    if options == "bare":
        D = z = bias = None
    if options == "channels_last":
        u, delta, z = [t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (u, delta, z)]
    kw = dict(delta_softplus=options != "bare", return_last_state=True)
    with triton_on_cpu():
        out, last = selective_scan_fn(u, delta, A, B, C, D, z, bias, **kw)
    ref, last_ref = selective_scan_ref(u, delta, A, B, C, D, z, bias, **kw)
    assert out.dtype == dtype and out.shape == u.shape
    if options == "channels_last":  # written in u's layout: coalesced stores, and no copy for the caller
        assert out.stride(1) == 1
    inputs = (u, delta, A, B, C, D, z, bias)
    g, gl = torch.randn_like(out), torch.randn_like(last)
    with triton_on_cpu():
        got = grads((out, last), inputs, (g, gl))
    want = grads((ref, last_ref), inputs, (g, gl))
    names = [n for n, t in zip("u delta A B C D z bias".split(), inputs) if t is not None]
    assert_close_all([out, last, *got], [ref, last_ref, *want], dtype, ["out", "last_state", *names])


@pytest.mark.parametrize("lanes_on_channels", [False, True])
def test_scan_walk_variants_agree(lanes_on_channels):
    """The plain unrolled walks and the prefetching ones (loads issued ahead of the stores) compute the same
    thing, forward and backward, for both directions with gates, on lengths that end mid-group."""
    from mamba_ssm.ops.triton import selective_scan as ss

    R, b, d, N, L = 2, 3, 40, 8, 23
    cl = lambda: torch.randn(R, b, L, d).transpose(2, 3)  # noqa: E731  (the mixer's channel-contiguous layout)
    u, delta = cl(), 0.5 * cl()
    A, B, C = -torch.rand(R, d, N) - 0.5, torch.randn(R, b, 1, N, L), torch.randn(R, b, 1, N, L)
    D, z, bias = torch.randn(R, d), torch.randn(b, L, d).transpose(1, 2), torch.randn(R, d)
    gate, dout = torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.0, 0.3]]), torch.randn(b, L, d).transpose(1, 2)
    args = (u, delta, A, B, C, D, z, bias, True, gate, 0.5)
    results = []
    with triton_on_cpu():
        for prefetch in (False, True):
            out = torch.empty(b, L, d).transpose(1, 2)
            last, ckpt = ss.scan_forward(*args, out, want_last=True, want_ckpt=True, unroll=4, block_d=16,
                                         lanes_on_channels=lanes_on_channels, prefetch=prefetch)
            g = ss.scan_backward(*args, dout, ckpt=ckpt, block_d=16, prefetch=prefetch)
            results.append([out, last, ckpt] + [g[k] for k in sorted(g)])
    for a, c in zip(*results):
        assert torch.allclose(a, c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last,want_ckpt", [(True, False), (True, True), (False, False)])
def test_scan_split_directions_agree(channels_last, want_ckpt):
    """A program per direction with one output each, summed after the launch (split_dirs), computes what one
    program running both directions computes: outputs, last states and checkpoints, with a sample whose
    directions are both gated off and one with only direction 1 on."""
    from mamba_ssm.ops.triton import selective_scan as ss

    R, b, d, N, L = 2, 4, 40, 8, 21
    act = (lambda *s: torch.randn(*s[:-2], s[-1], s[-2]).transpose(-1, -2)) if channels_last else torch.randn
    u, delta, z = act(R, b, d, L), 0.5 * act(R, b, d, L), act(b, d, L)
    A, B, C = -torch.rand(R, d, N) - 0.5, torch.randn(R, b, 1, N, L), torch.randn(R, b, 1, N, L)
    D, bias = torch.randn(R, d), torch.randn(R, d)
    gate = torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.0, 0.3], [0.0, 0.0]])
    results = []
    with triton_on_cpu():
        for split in (False, True):
            out = act(b, d, L).fill_(float("nan"))  # every element must be written
            last, ckpt = ss.scan_forward(u, delta, A, B, C, D, z, bias, True, gate, 0.5, out, want_last=True,
                                         want_ckpt=want_ckpt, block_d=16, split_dirs=split)
            assert out.stride() == z.stride()
            ran = (gate.t() != 0) | want_ckpt  # (R, b): a gated-off walk leaves its last state unwritten
            results.append([out, last[ran]] + ([ckpt] if want_ckpt else []))
    assert torch.isfinite(results[1][0]).all()
    assert (results[1][0][3] == 0).all()  # both directions off: zeros
    for a, c in zip(*results):
        assert torch.allclose(a, c, rtol=1e-5, atol=1e-6)


def scan_weights(dim, dt_rank, d_state, dtype):
    w = ScanWeights(0.5 * torch.randn(dim, 1, 4), 0.1 * torch.randn(dim), 0.2 * torch.randn(dt_rank + 2 * d_state, dim),
                    0.3 * torch.randn(dim, dt_rank), 0.3 * torch.randn(dim) - 1, -torch.rand(dim, d_state) - 0.5,
                    torch.randn(dim))
    return ScanWeights(*[t.to(dtype) if i < 4 else t for i, t in enumerate(w)])


@pytest.mark.parametrize("dtype,seqlen,gated,masked", [
    (torch.float32, 50, False, False),
    (torch.float32, 50, True, True),
    (torch.bfloat16, 37, True, True),
    (torch.float32, 1, True, False),
])
def test_bimamba_matches_reference(dtype, seqlen, gated, masked):
    batch, dim = 3, 40
    fwd, bwd = scan_weights(dim, 4, 8, dtype), scan_weights(dim, 4, 8, dtype)
    xz = torch.randn(batch, seqlen, 2 * dim, dtype=dtype).transpose(1, 2)  # in_proj's layout
    gate = torch.tensor([[1.0, 0.0], [0.7, 1.3], [0.0, 0.0]]) if gated else None
    # a training mask carries the pruning decisions' straight-through gradient
    mask = (torch.rand(batch, seqlen) > 0.3).to(dtype).requires_grad_() if masked else None
    leaves = [t.detach().requires_grad_() for t in (xz, *fwd, *bwd)]
    gate_leaf = gate.clone().requires_grad_() if gated else None
    args = (leaves[0], ScanWeights(*leaves[1:8]), ScanWeights(*leaves[8:15]), gate_leaf, mask)
    with triton_on_cpu():
        out = bimamba_v2_inner_fn(*args)
    ref = bimamba_v2_inner_ref(*args)
    inputs = [*leaves, gate_leaf, mask]
    g = torch.randn_like(out)
    with triton_on_cpu():
        got = grads(out, inputs, g)
    want = grads(ref, inputs, g)
    names = ["xz", *[f"fwd.{n}" for n in ScanWeights._fields], *[f"bwd.{n}" for n in ScanWeights._fields], "gate",
             "mask"]
    names = [n for n, t in zip(names, inputs) if t is not None]
    assert_close_all([out, *got], [ref, *want], dtype, ["out", *names])


def test_bimamba_gated_off_sample_is_not_computed():
    """Inference: a sample whose two gates are 0 is never read by the conv or the scan (NaN input stays
    out of the result) and gets zeros; a direction gated off contributes nothing."""
    batch, dim, seqlen = 3, 40, 29
    fwd, bwd = scan_weights(dim, 4, 8, torch.float32), scan_weights(dim, 4, 8, torch.float32)
    xz = torch.randn(batch, seqlen, 2 * dim).transpose(1, 2)
    xz[2] = float("nan")
    gate = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    with torch.no_grad(), triton_on_cpu():
        out = bimamba_v2_inner_fn(xz, fwd, bwd, gate)
    with torch.no_grad():
        ref = bimamba_v2_inner_ref(xz[:2], fwd, bwd, gate[:2])
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert rel(out[:2], ref) < 1e-5


def test_mamba_inference_weight_cache_follows_parameter_updates():
    """Inference on the kernels reuses the stacked scan weights while the parameters are unchanged, and
    an in-place update (an optimizer step, load_state_dict) is seen at the next call."""
    from mamba_ssm.modules.mamba_simple import Mamba

    torch.manual_seed(0)
    mixer = Mamba(16, d_state=8, bimamba_type="v2", if_divide_out=True)
    xz = torch.randn(2, 2 * mixer.d_inner, 21)
    with torch.no_grad():
        ref = mixer.mix(xz)  # CPU reference path: no cache
        with triton_on_cpu():
            out = mixer.mix(xz)
            first = mixer.__dict__["_v2_cache"]
            mixer.mix(xz)
            assert mixer.__dict__["_v2_cache"] is first  # reused
            assert rel(out, ref) < 1e-5
            mixer.A_b_log.add_(0.3)
            mixer.conv1d.weight.mul_(-1.0)
            out = mixer.mix(xz)
            assert mixer.__dict__["_v2_cache"] is not first
        ref = mixer.mix(xz)
    assert rel(out, ref) < 1e-5
    with triton_on_cpu():  # training: no cache, gradients reach the parameters
        mixer.__dict__.pop("_v2_cache")
        mixer.mix(xz).sum().backward()
    assert "_v2_cache" not in mixer.__dict__ and mixer.A_b_log.grad is not None


@pytest.mark.parametrize("dtype,seqlen,activation,channels_last,width", [
    (torch.float32, 50, "silu", False, 4),
    (torch.float32, 1, None, False, 4),
    (torch.float32, 37, "silu", True, 3),
    (torch.bfloat16, 50, "silu", False, 2),
])
def test_causal_conv1d_matches_reference(dtype, seqlen, activation, channels_last, width):
    dim = 70  # 64-channel blocks: two of them
    x = torch.randn(2, seqlen, dim, dtype=dtype).transpose(1, 2) if channels_last else torch.randn(2, dim, seqlen, dtype=dtype)
    w, b = torch.randn(dim, width, dtype=dtype), torch.randn(dim, dtype=dtype)
    inputs = [t.detach().requires_grad_() for t in (x, w, b)]
    with triton_on_cpu():
        out = causal_conv1d_fn(*inputs, activation=activation)
    ref = causal_conv1d_ref(*inputs, activation=activation)
    if channels_last and seqlen > 1:  # the output keeps x's memory layout, as upstream's does
        assert out.stride() == x.stride()
    g = torch.randn_like(out)
    with triton_on_cpu():
        got = grads(out, inputs, g)
    assert_close_all([out, *got], [ref, *grads(ref, inputs, g)], dtype, ["out", "x", "w", "b"])


@pytest.mark.parametrize("channels_last,width,n_dirs,masked,silu", [
    (False, 4, 2, True, True), (True, 4, 2, True, True), (True, 3, 1, False, True), (False, 2, 2, False, False),
    (True, 2, 2, False, False), (True, 3, 2, True, True),
])
def test_stacked_conv_small_tiles(channels_last, width, n_dirs, masked, silu):
    """The stacked conv op (both directions, mask) with tiles smaller than the sequence and the channels, so
    the backward's tile edges (time-contiguous) and its walk's unrolled steps and start/end (channel-
    contiguous) are exercised, for widths 2 to 4."""
    from causal_conv1d.conv_op import _stacked_ref
    from causal_conv1d.triton_causal_conv1d import conv_backward, conv_forward

    batch, dim, seqlen = 2, 40, 37
    x = torch.randn(batch, seqlen, dim).transpose(1, 2) if channels_last else torch.randn(batch, dim, seqlen)
    w, b = torch.randn(n_dirs, dim, width), torch.randn(n_dirs, dim)
    mask = (torch.rand(batch, seqlen) > 0.3).float() if masked else None
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    ref = _stacked_ref(*leaves, mask, silu)
    dout = torch.randn_like(ref)
    want = torch.autograd.grad(ref, leaves, dout)
    tiles = dict(block_t=8, block_d=16, num_warps=1)
    with triton_on_cpu():
        out = conv_forward(x, w, b, mask, silu, torch.empty_like(ref), **tiles)
        dx, dw, db = conv_backward(x, w, b, mask, silu, dout, **tiles)
    assert dx.stride() == x.stride()
    assert_close_all([out, dx, dw, db], [ref, *want], torch.float32, ["out", "dx", "dw", "dbias"])


@pytest.mark.parametrize("is_rms,residual,prenorm,res_fp32,dtype", [
    (True, True, True, True, torch.float32),
    (True, True, True, True, torch.bfloat16),
    (True, False, False, False, torch.float32),
    (False, True, True, False, torch.float32),
    (False, False, True, True, torch.bfloat16),
])
def test_add_norm_matches_reference(is_rms, residual, prenorm, res_fp32, dtype):
    x = torch.randn(3, 5, 96, dtype=dtype)
    res = torch.randn(3, 5, 96, dtype=torch.float32) if residual else None
    w = torch.randn(96)
    b = None if is_rms else torch.randn(96)
    inputs = [t.requires_grad_() if t is not None else None for t in (x, res, w, b)]
    args = (inputs[0], inputs[2], inputs[3], inputs[1], 1e-5, prenorm, res_fp32, is_rms)
    out, ref = layer_norm_triton(*args), layer_norm_ref(*args)
    out, ref = (out if prenorm else (out,)), (ref if prenorm else (ref,))
    for o, r in zip(out, ref):
        assert o.dtype == r.dtype and o.shape == r.shape
    gs = [torch.randn_like(o, dtype=torch.float32).to(o.dtype) for o in out]
    got, want = grads(out, inputs, gs), grads(ref, inputs, gs)
    assert_close_all([*out, *got], [*ref, *want], dtype, ["out", "residual_out", "x", "res", "w", "b"][:len(out)] +
                     [n for n, t in zip(["x", "res", "w", "b"], inputs) if t is not None])


def test_flop_counter_sees_the_scan():
    """FlopCounterMode counts the custom op with targets.md's MACs (x2 FLOPs), per direction run."""
    u, delta, A, B, C, D, z, bias = scan_inputs(2, 40, 23, 8, torch.float32)
    with triton_on_cpu(), FlopCounterMode(display=False) as counter:
        selective_scan_fn(u, delta, A, B, C, D, z, bias, delta_softplus=True)
    assert counter.get_total_flops() == 2 * (9 * 2 * 23 * 40 * 8 + 2 * 2 * 23 * 40)
    assert scan_macs((2, 2, 40, 23), 8) == 2 * (9 * 2 * 23 * 40 * 8 + 2 * 2 * 23 * 40)
    x, w = torch.randn(2, 40, 23), torch.randn(40, 4)
    with triton_on_cpu(), FlopCounterMode(display=False) as counter:
        causal_conv1d_fn(x, w, None, activation="silu")
    assert counter.get_total_flops() == 2 * conv_macs((2, 40, 23), (1, 40, 4)) == 2 * 2 * (23 + 3) * 40 * 4


def test_eager_calls_skip_the_dispatcher_but_not_what_watches_ops():
    """Eager calls run the implementations (an autograd.Function when a gradient is needed); torch.compile,
    FlopCounterMode and FakeTensorMode get the custom ops. Same values and gradients either way."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from causal_conv1d.kernel_utils import needs_grad, ops_watched

    x, w = torch.randn(2, 3), torch.randn(3).requires_grad_()
    assert not ops_watched() and needs_grad(x, w) and not needs_grad(x, None)
    with torch.no_grad():
        assert not needs_grad(x, w)
        with FlopCounterMode(display=False):
            assert ops_watched()
    with FakeTensorMode():
        assert ops_watched()
    batch, dim, seqlen = 2, 40, 19
    weights = [scan_weights(dim, 4, 8, torch.float32) for _ in range(2)]
    leaves = [t.detach().requires_grad_() for t in (torch.randn(batch, seqlen, 2 * dim).transpose(1, 2),
                                                   *weights[0], *weights[1])]
    args = (leaves[0], ScanWeights(*leaves[1:8]), ScanWeights(*leaves[8:15]))
    g = torch.randn(batch, dim, seqlen)
    results, backward_nodes = [], []
    for watched in (False, True):
        with triton_on_cpu(), FlopCounterMode(display=False) if watched else torch.enable_grad() as counter:
            out = bimamba_v2_inner_fn(*args)
            backward_nodes.append(type(out.grad_fn).__name__)
            results.append([out, *grads(out, leaves, g)])
    assert backward_nodes[0].startswith("_EagerScan") and not backward_nodes[1].startswith("_EagerScan")
    counts = {str(k) for k in counter.get_flop_counts()["Global"]}
    assert {"mamba_ssm.scan_bwd", "causal_conv1d.conv_bwd"} <= counts  # the watched backward ran the ops
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    with torch.no_grad(), triton_on_cpu():
        with FlopCounterMode(display=False) as counter:
            bimamba_v2_inner_fn(*args)
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert counts["mamba_ssm.scan_fwd"] == 2 * scan_macs((2, batch, dim, seqlen), 8)
    assert counts["causal_conv1d.conv_fwd"] == 2 * conv_macs((batch, dim, seqlen), (2, dim, 4))


def test_dispatch_and_errors(monkeypatch):
    x = torch.randn(2, 4, 8)
    assert not triton_enabled(x, "selective_scan")  # CPU tensors take the reference
    with triton_on_cpu():
        assert triton_enabled(x, "selective_scan")
        monkeypatch.setenv(FORCE_REFERENCE_ENV, "1")
        assert not triton_enabled(x, "selective_scan")
    u, delta, A, B, C, D, z, bias = scan_inputs(2, 40, 23, 8, torch.float32)
    with triton_on_cpu(), pytest.raises(ValueError, match="D must be"):
        selective_scan_fn(u, delta, A, B, C, D[:3])


def test_env_report_names_every_op():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "dyvm.env"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    for needle in ("torch:", "triton:", "gpu:", "selective_scan_fn: PyTorch implementation (cpu tensors)",
                   "bimamba_v2_inner_fn", "rms_norm_fn", "causal_conv1d_fn"):
        assert needle in out.stdout, out.stdout


def test_custom_op_registration():
    """Schema, fake implementation (torch.compile), autograd registration: torch.library's own checks."""
    b, d, L, N = 2, 8, 5, 4
    args = [torch.randn(2, b, d, L), torch.randn(2, b, d, L), -torch.rand(2, d, N), torch.randn(2, b, 1, N, L),
            torch.randn(2, b, 1, N, L), torch.randn(2, d), torch.randn(b, d, L), torch.randn(2, d), torch.rand(b, 2)]
    args = [t.requires_grad_() for t in args]
    result = torch.library.opcheck(torch.ops.mamba_ssm.scan_fwd.default, (*args, True, 0.5, False, True))
    assert all(v == "SUCCESS" for v in result.values()), result
    conv_args = [torch.randn(b, d, L), torch.randn(2, d, 4), torch.randn(2, d)]
    conv_args = [t.requires_grad_() for t in conv_args] + [(torch.rand(b, L) > 0.3).float(), None]
    result = torch.library.opcheck(torch.ops.causal_conv1d.conv_fwd.default, (*conv_args, True, True))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_kernel_files_are_leaves():
    """The kernel files (Triton and CPU) import only the standard library, torch, Triton and the shared kernel
    utilities (no op module, no interface), so the op layers sit on top of them without import cycles, as in
    upstream mamba. ops/triton/layernorm.py is the norm's API module (upstream's import path): it may load its
    two implementations, which are leaves themselves."""
    import ast
    import pathlib

    import causal_conv1d
    import mamba_ssm

    stdlib_and_deps = {"typing", "json", "os", "importlib", "contextlib", "functools", "torch", "triton"}
    shared = {"causal_conv1d.kernel_utils", "causal_conv1d.triton_utils"}
    implementations = {"mamba_ssm.ops.triton.layernorm_kernel", "mamba_ssm.ops.cpu.layernorm"}
    conv_dir, ops_dir = pathlib.Path(causal_conv1d.__file__).parent, pathlib.Path(mamba_ssm.__file__).parent / "ops"
    files = [conv_dir / n for n in ("triton_causal_conv1d.py", "cpu_causal_conv1d.py", "kernel_utils.py",
                                    "triton_utils.py")]
    files += sorted((ops_dir / "triton").glob("*.py")) + sorted((ops_dir / "cpu").glob("*.py"))
    for path in files:
        allowed = shared | (implementations if path.name == "layernorm.py" and path.parent.name == "triton" else set())
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] in stdlib_and_deps or name in allowed, f"{path.name} imports {name}"
