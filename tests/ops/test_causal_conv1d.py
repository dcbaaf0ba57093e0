"""causal_conv1d: the reference against a sum of taps, the Triton kernels against the reference (layouts,
widths, small tiles, stacked directions); the token mask's gradient from both Triton kernels and the CPU
implementation against autograd on the op's definition, and in the DyVM mixer against the formulation that
applied the mask around the op (same gradients, less saved for backward)."""
import itertools

import pytest
import torch

from causal_conv1d.causal_conv1d_interface import causal_conv1d_fn, causal_conv1d_ref
from causal_conv1d.conv_op import _stacked_ref
from mamba_ssm.ops.dispatch import triton_on_cpu
from tests.ops.helpers import assert_close_all, conv_by_taps, grads, rel


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("activation", [None, "silu", "swish"])
@pytest.mark.parametrize("bias", [True, False])
def test_causal_conv1d_matches_tap_sum(width, activation, bias):
    x = torch.randn(2, 5, 17, requires_grad=True)
    w = torch.randn(5, width, requires_grad=True)
    b = torch.randn(5, requires_grad=True) if bias else None
    out = causal_conv1d_fn(x, w, b, activation=activation)
    ref = conv_by_taps(x, w, b, activation)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    params = [p for p in (x, w, b) if p is not None]
    for got, want in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_causal_conv1d_errors_name_the_problem():
    x = torch.randn(2, 5, 9)
    with pytest.raises(ValueError, match="widths 2 to 4"):
        causal_conv1d_ref(x, torch.randn(5, 6))
    with pytest.raises(NotImplementedError, match="activation"):
        causal_conv1d_ref(x, torch.randn(5, 4), activation="relu")


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
        dx, dw, db, dmask = conv_backward(x, w, b, mask, silu, dout, **tiles)
    assert dx.stride() == x.stride() and dmask is None  # dmask only when asked for
    assert_close_all([out, dx, dw, db], [ref, *want], torch.float32, ["out", "dx", "dw", "dbias"])


def _mask_case(channels_last, n_dirs, width, bias, mask_kind, dtype, batch=2, dim=40, seqlen=37):
    """Fresh inputs of a stacked conv with a mask holding zeros (pruned tokens, which must still get a
    gradient) and, for mask_kind "soft", non-binary values."""
    x = torch.randn(batch, seqlen, dim).transpose(1, 2) if channels_last else torch.randn(batch, dim, seqlen)
    mask = (torch.rand(batch, seqlen) > 0.3).float()
    if mask_kind == "soft":
        mask = mask * (0.25 + 1.5 * torch.rand(batch, seqlen))
    w, b = torch.randn(n_dirs, dim, width), torch.randn(n_dirs, dim) if bias else None
    dout = torch.randn(n_dirs, batch, dim, seqlen)
    return [None if t is None else t.to(dtype) for t in (x, w, b, mask, dout)]


def _autograd_grads(x, w, b, mask, silu, dout):
    """Gradients of the op's definition (_stacked_ref) in fp64 on the same (rounded) inputs: [dx, dw, (db,) dmask]."""
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b, mask) if t is not None]
    xl, wl, ml = leaves[0], leaves[1], leaves[-1]
    out = _stacked_ref(xl, wl, leaves[2] if b is not None else None, ml, silu)
    return list(torch.autograd.grad(out, leaves, dout.double()))


def _check_mask_grads(got, want, dtype):
    """dx in the input's dtype (TOL of that dtype); dweight, dbias, dmask are fp32 outputs of fp32 arithmetic
    on the inputs as given, so they must match to fp32 rounding even for bf16 inputs."""
    names = ["dx", "dweight", "dbias", "dmask"] if len(want) == 4 else ["dx", "dweight", "dmask"]
    assert got[-1].dtype in (torch.float32, torch.float64) and got[-1].shape == want[-1].shape
    assert_close_all(got[:1], want[:1], dtype, names[:1])
    assert_close_all(got[1:], want[1:], torch.float32, names[1:])


@pytest.mark.parametrize("channels_last,n_dirs,width,bias,silu,mask_kind,dtype", [
    (True, 2, 4, True, True, "binary", torch.float32),
    (False, 2, 4, True, True, "binary", torch.float32),
    (True, 1, 3, False, False, "soft", torch.float32),
    (False, 1, 2, True, False, "soft", torch.float32),
    (True, 2, 2, False, True, "soft", torch.bfloat16),
    (False, 2, 3, True, False, "binary", torch.bfloat16),
    (True, 2, 3, True, False, "binary", torch.float32),
    (False, 1, 4, False, True, "soft", torch.bfloat16),
])
def test_triton_conv_mask_grad(channels_last, n_dirs, width, bias, silu, mask_kind, dtype):
    """dmask from the Triton backward kernels (the walk for channel-contiguous x, the tiled one for
    time-contiguous x), with tiles smaller than the sequence and the channels (several partial sums per
    sample), against autograd on the op's definition; the other gradients unchanged by asking for it."""
    from causal_conv1d.triton_causal_conv1d import conv_backward

    x, w, b, mask, dout = _mask_case(channels_last, n_dirs, width, bias, mask_kind, dtype)
    tiles = dict(block_t=8, block_d=16, num_warps=1)
    with triton_on_cpu():
        got = conv_backward(x, w, b, mask, silu, dout, mask_grad=True, **tiles)
        plain = conv_backward(x, w, b, mask, silu, dout, **tiles)
    assert plain[3] is None and all(torch.equal(a, c) for a, c in zip(got[:3], plain[:3]) if a is not None)
    _check_mask_grads([t for t in got if t is not None], _autograd_grads(x, w, b, mask, silu, dout), dtype)


def test_conv_lengths_skip_only_zeros():
    """With lengths where the mask and the output gradient are 0 from lengths[b] on (DyVM's kept-only training),
    the channel-contiguous backward walk stops 3 steps after that point and writes zeros after: the same
    gradients, dmask included (not 0 in those 3 steps), bit for bit. Lengths on a group boundary, inside a
    group, 0 and L."""
    from causal_conv1d.triton_causal_conv1d import conv_backward

    batch, dim, seqlen, width = 4, 24, 23, 4
    lengths = torch.tensor([23, 16, 0, 9], dtype=torch.int32)
    inside = torch.arange(seqlen) < lengths[:, None].long()
    x = torch.randn(batch, seqlen, dim).transpose(1, 2)
    w, b = torch.randn(2, dim, width), torch.randn(2, dim)
    mask = inside * (0.5 + torch.rand(batch, seqlen))
    dout = torch.randn(2, batch, dim, seqlen) * inside[None, :, None, :]
    tiles = dict(block_t=8, block_d=16, num_warps=1)
    results = []
    with triton_on_cpu():
        for lens in (None, lengths):
            dx = torch.full((batch, seqlen, dim), float("nan")).transpose(1, 2)
            results.append(conv_backward(x, w, b, mask, True, dout, mask_grad=True, dx_out=dx, lengths=lens, **tiles))
    assert results[0][3][3, 9:12].abs().min() > 0  # dmask right after the end: direction 1 reads ahead
    for name, a, c in zip(["dx", "dw", "db", "dmask"], *results):
        assert torch.equal(a, c), name


def test_cpu_conv_mask_grad():
    """dmask from the CPU implementation against autograd on the op's definition, over every combination:
    layouts, one and two directions, widths 2 to 4, bias, SiLU, binary and non-binary masks, fp32 and bf16
    inputs (fp64 ones: to rounding)."""
    from causal_conv1d import cpu_causal_conv1d as cpu_conv

    grid = itertools.product((False, True), (1, 2), (2, 3, 4), (False, True), (False, True), ("binary", "soft"),
                             (torch.float32, torch.bfloat16, torch.float64))
    for channels_last, n_dirs, width, bias, silu, mask_kind, dtype in grid:
        case = (channels_last, n_dirs, width, bias, silu, mask_kind, dtype)
        x, w, b, mask, dout = _mask_case(channels_last, n_dirs, width, bias, mask_kind, dtype, dim=12, seqlen=19)
        got = [t for t in cpu_conv.conv_backward(x, w, b, mask, silu, dout, mask_grad=True) if t is not None]
        want = _autograd_grads(x, w, b, mask, silu, dout)
        if dtype == torch.float64:
            errors = [rel(a, c) for a, c in zip(got, want)]
            assert max(errors) < 1e-12, (case, errors)
        else:
            _check_mask_grads(got, want, dtype)


def test_conv_op_mask_grad_through_autograd_and_the_custom_ops():
    """conv_apply with a mask that needs a gradient: eagerly (the autograd.Function), under FlopCounterMode
    (the custom ops conv_fwd / conv_bwd) and through torch.library.opcheck (fake implementations, autograd
    registration), same gradients as autograd on the definition."""
    from torch.utils.flop_counter import FlopCounterMode

    from causal_conv1d.conv_op import conv_apply

    x, w, b, mask, dout = _mask_case(True, 2, 4, True, "soft", torch.float32, dim=12, seqlen=19)
    want = _autograd_grads(x, w, b, mask, True, dout)
    for watched in (False, True):
        leaves = [t.detach().requires_grad_() for t in (x, w, b, mask)]
        with FlopCounterMode(display=False) if watched else torch.enable_grad() as counter:
            out = conv_apply(*leaves[:3], leaves[3], None, True, True)
            got = torch.autograd.grad(out, leaves, dout)
        assert_close_all(got, want, torch.float32, ["dx", "dweight", "dbias", "dmask"])
        if watched:
            assert "causal_conv1d.conv_bwd" in {str(k) for k in counter.get_flop_counts()["Global"]}
    leaves = [t.detach().requires_grad_() for t in (x, w, b, mask)]
    for op, args in ((torch.ops.causal_conv1d.conv_fwd.default, (*leaves, None, True, True)),
                     (torch.ops.causal_conv1d.conv_bwd.default, (x, w, b, mask, True, dout, True))):
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), result


def _saved_bytes(step):
    """Run step() and return (its result, bytes of the distinct storages autograd saved for backward)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = step()
    return result, sum(storages.values())


def test_dyvm_mixer_mask_grad_inside_the_op_matches_the_mask_around_it(monkeypatch):
    """The DyVM mixer (bimamba_v2_inner_stacked) in training, the mask carrying a gradient: with the mask
    given to the conv op, every gradient (x and z, the weights, the mask, the gates) is what the former
    formulation gave, which multiplied the op's input and output by the mask outside it; and autograd no
    longer saves the masked input (b, d, L) and the conv's unmasked output (2, b, d, L)."""
    import mamba_ssm.ops.bimamba_stacked as stacked
    from mamba_ssm.ops.bimamba_interface import ScanWeights
    from tests.ops.helpers import scan_weights

    batch, dim, seqlen, dtype = 3, 16, 21, torch.float64
    weights = [scan_weights(dim, 4, 8, dtype) for _ in range(2)]
    xz = torch.randn(batch, seqlen, 2 * dim, dtype=dtype).transpose(1, 2)  # in_proj's layout
    gate = torch.tensor([[1.0, 0.0], [0.7, 1.3], [0.2, 1.0]], dtype=dtype)
    mask = (torch.rand(batch, seqlen) > 0.3).to(dtype)
    dout = torch.randn(batch, dim, seqlen, dtype=dtype)
    inner = stacked.conv_apply

    def mask_around(x, weight, bias, mask, gate_skip, silu, channels_last_out, mixer_grads, lengths=None):
        xc = inner(x * mask[:, None], weight, bias, None, gate_skip, silu, channels_last_out)  # (x * mask: no sink)
        return xc * mask[None, :, None]

    def step():
        leaves = [t.detach().requires_grad_() for t in (xz, *weights[0], *weights[1], gate, mask)]
        out = stacked.bimamba_v2_inner_stacked(leaves[0], ScanWeights(*leaves[1:8]), ScanWeights(*leaves[8:15]),
                                               leaves[15], leaves[16])
        return out, leaves

    (out, leaves), saved = _saved_bytes(step)
    got = torch.autograd.grad(out, leaves, dout)
    monkeypatch.setattr(stacked, "conv_apply", mask_around)
    (out_around, leaves), saved_around = _saved_bytes(step)
    want = torch.autograd.grad(out_around, leaves, dout)
    names = ["xz", *[f"fwd.{n}" for n in ScanWeights._fields], *[f"bwd.{n}" for n in ScanWeights._fields], "gate",
             "mask"]
    assert rel(out, out_around) < 1e-13
    for name, a, c in zip(names, got, want):
        assert rel(a, c) < 1e-12, f"{name}: relative error {rel(a, c):.1e}"
    assert saved_around - saved == 3 * batch * dim * seqlen * 8, (saved_around, saved)
