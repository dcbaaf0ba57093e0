"""Depthwise causal 1-D convolution, with the causal-conv1d (upstream) call signature.

`causal_conv1d_fn` runs through the custom op causal_conv1d::conv_fwd (conv_op.py): the Triton kernel for
CUDA tensors (compiled at first use), the PyTorch implementation (cpu_causal_conv1d.py) for other devices.
MAMBA_FORCE_REFERENCE=1 sends it to `causal_conv1d_ref` (F.conv1d) instead.
"""
import torch.nn.functional as F

from causal_conv1d import conv_op  # noqa: F401  (registers the custom ops and their FLOP formulas up front)
from causal_conv1d.conv_op import conv_apply
from causal_conv1d.kernel_utils import reference_forced, triton_enabled

_ACTIVATIONS = (None, "silu", "swish")


def _check_args(x, weight, bias, activation):
    if activation not in _ACTIVATIONS:
        raise NotImplementedError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d expects x of shape (batch, dim, seqlen), got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight must be (dim, width) with dim={x.shape[1]}, got {tuple(weight.shape)}")
    if not 2 <= weight.shape[1] <= 4:
        raise ValueError(f"causal_conv1d supports kernel widths 2 to 4, got {weight.shape[1]}")
    if bias is not None and bias.shape != (x.shape[1],):
        raise ValueError(f"bias must be ({x.shape[1]},), got {tuple(bias.shape)}")


def causal_conv1d_ref(x, weight, bias=None, activation=None):
    """x: (batch, dim, seqlen); weight: (dim, width); bias: (dim,) -> (batch, dim, seqlen), x's dtype.

    out[:, d, t] = act(bias[d] + sum_k weight[d, k] * x[:, d, t - (width-1) + k]), zero padding on the left.
    """
    _check_args(x, weight, bias, activation)
    dtype_in = x.dtype
    width = weight.shape[1]
    seqlen = x.shape[-1]
    out = F.conv1d(x.to(weight.dtype), weight.unsqueeze(1), bias, padding=width - 1, groups=x.shape[1])
    out = out[..., :seqlen]
    if activation is not None:
        out = F.silu(out)
    return out.to(dtype_in)


def use_triton(x):
    """True when `x` should take the Triton kernel (CUDA tensor, Triton importable, not forced off)."""
    return triton_enabled(x, "causal_conv1d.triton_causal_conv1d")


def causal_conv1d_op(x, weight, bias=None, activation=None):
    """causal_conv1d_fn through conv_op.conv_apply, on any device (arguments checked by the caller)."""
    # The output in x's memory layout (as upstream: channel-last in, channel-last out), so the stores
    # coalesce; squeeze, not [0]: the gradient of a select is a zero-filled copy in the default layout.
    return conv_apply(x, weight.contiguous()[None], None if bias is None else bias[None], None, None,
                      activation is not None, x.stride(1) == 1 and x.stride(2) != 1).squeeze(0)


def causal_conv1d_fn(x, weight, bias=None, activation=None):
    """Same as `causal_conv1d_ref`, through the custom op (see the module docstring)."""
    if reference_forced():
        return causal_conv1d_ref(x, weight, bias, activation)
    _check_args(x, weight, bias, activation)
    return causal_conv1d_op(x, weight, bias, activation)
