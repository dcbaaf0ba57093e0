"""causal_conv1d: the reference against a sum of taps, the Triton kernels against the reference (layouts,
widths, small tiles, stacked directions)."""
import pytest
import torch

from causal_conv1d.causal_conv1d_interface import causal_conv1d_fn, causal_conv1d_ref
from mamba_ssm.ops.dispatch import triton_on_cpu
from tests.ops.helpers import assert_close_all, conv_by_taps, grads


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
