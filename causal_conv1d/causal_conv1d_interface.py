"""Depthwise causal 1-D convolution, with the causal-conv1d (upstream) call signature.

`causal_conv1d_fn` dispatches: CUDA tensors go to the Triton kernel (compiled at first use) through the
custom op causal_conv1d::conv_fwd (conv_op.py), everything else to `causal_conv1d_ref`. Set MAMBA_FORCE_REFERENCE=1 to take the reference on a GPU too.
"""
import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

from causal_conv1d import conv_op  # noqa: F401  (registers the custom ops and their FLOP formulas up front)

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


_triton_on_cpu = False  # tests: run the kernels on CPU tensors under TRITON_INTERPRET=1


@contextmanager
def triton_on_cpu():
    """Send CPU tensors to the Triton kernels (only meaningful with TRITON_INTERPRET=1; for tests)."""
    global _triton_on_cpu
    previous, _triton_on_cpu = _triton_on_cpu, True
    try:
        yield
    finally:
        _triton_on_cpu = previous


def use_triton(x):
    """True when `x` should take the Triton kernel (CUDA tensor, Triton importable, not forced off)."""
    if not (x.is_cuda or _triton_on_cpu) or os.environ.get("MAMBA_FORCE_REFERENCE", "0") not in ("", "0"):
        return False
    try:
        from causal_conv1d import triton_causal_conv1d  # noqa: F401
    except ImportError:
        return False
    return True


def ops_watched() -> bool:
    """Whether something watches ops, so that calls must go through our torch.library custom ops:
    torch.compile tracing, or a dispatch mode (FlopCounterMode, FakeTensorMode). Otherwise (eager) the
    ops' implementations run directly, under a torch.autograd.Function when a gradient is needed: the same
    computation without the custom-op dispatcher's overhead (0.1 to 0.2 ms per call on an H200 host,
    cProfile of an eager Vim-S forward), which bounds eager inference and small-batch training."""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def causal_conv1d_fn(x, weight, bias=None, activation=None):
    """Same as `causal_conv1d_ref`; Triton kernel for CUDA tensors."""
    _check_args(x, weight, bias, activation)
    if use_triton(x):
        from causal_conv1d.triton_causal_conv1d import causal_conv1d_triton

        return causal_conv1d_triton(x, weight, bias, activation)
    return causal_conv1d_ref(x, weight, bias, activation)
