"""The mixers' Linear layers (in_proj, out_proj) in fp32 on a GPU: three TF32 tensor-core products instead of
cuBLAS's CUDA-core fp32 (mamba_ssm.ops.triton.linear_tf32x3 says how, and how close to fp64 it is).

`linear(x, weight, bias)` is F.linear(x, weight, bias). It takes the kernel where all of this holds, and F.linear
otherwise: fp32 input and weight with no autocast (under autocast F.linear runs in the autocast dtype), TF32 matmuls
not allowed (with `--tf32` the user asked for cuBLAS's plain TF32, which is faster), (batch, L, K) input of at least
MIN_ROWS tokens (it was measured at 8704 to 25216 rows; tiny inputs keep cuBLAS), a GPU with TF32 tensor cores
(compute capability 8.0 or later) or the interpreter in tests, nothing tracing or watching the ops (torch.compile,
FLOP counters, fake tensors see F.linear), and ENABLED (False: cuBLAS throughout, for A/B runs; also
MAMBA_FP32_LINEAR=cublas). The backward: the input's gradient by the same kernel (the weight transposed, copied),
the weight's by cuBLAS in fp32 as F.linear's backward computes it (the kernel was no faster there: 555 against 580
us at in_proj's size), the bias's as a sum over tokens.
"""
import os
import warnings
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from causal_conv1d.kernel_utils import needs_grad, ops_watched, triton_enabled

KERNELS = "mamba_ssm.ops.triton.linear_tf32x3"
ENABLED = os.environ.get("MAMBA_FP32_LINEAR", "tf32x3") != "cublas"
MIN_ROWS = 1024


@lru_cache(maxsize=None)
def _has_tf32_cores(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


_NO_ROOM = set()  # devices where even one pipeline stage of the kernel's tiles did not fit: F.linear there


def tf32x3_applies(x: Tensor, weight: Tensor) -> bool:
    """Whether linear(x, weight, ...) takes the kernel (see the module docstring)."""
    return (ENABLED and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.dim() == 3
            and x.shape[0] * x.shape[1] >= MIN_ROWS and not torch.backends.cuda.matmul.allow_tf32
            and not torch.is_autocast_enabled(x.device.type) and not ops_watched()
            and triton_enabled(x, KERNELS)
            and (not x.is_cuda or (_has_tf32_cores(x.device.index or 0) and x.device.index not in _NO_ROOM)))


def linear(x: Tensor, weight: Tensor, bias=None) -> Tensor:
    """F.linear(x, weight, bias), fp32 on TF32 tensor cores where tf32x3_applies."""
    if not tf32x3_applies(x, weight):
        return F.linear(x, weight, bias)
    return linear_on_kernel(x, weight, bias)


def linear_on_kernel(x: Tensor, weight: Tensor, bias=None) -> Tensor:
    """linear() for a caller that has checked tf32x3_applies itself (Mamba.linear, which runs the Linear module
    where the kernel does not apply): the kernel, with autograd when a gradient is wanted."""
    from triton.runtime.errors import OutOfResources

    from mamba_ssm.ops.triton.linear_tf32x3 import linear_tf32x3

    try:
        if needs_grad(x, weight, bias):
            return _LinearTF32x3.apply(x, weight, bias)
        return linear_tf32x3(x, _k_contiguous(weight), bias)
    except OutOfResources as e:  # the kernel's tiles do not fit this GPU's shared memory at all: cuBLAS from now on
        _NO_ROOM.add(x.device.index)
        warnings.warn(f"fp32 in_proj / out_proj stay on cuBLAS on this GPU (the tf32x3 kernel: {e})", stacklevel=2)
        return F.linear(x, weight, bias)


def _k_contiguous(weight: Tensor) -> Tensor:
    """The (N, K) weight with K contiguous, as the kernel reads it (a copy only where it is not)."""
    return weight if weight.stride(1) == 1 else weight.contiguous()


class _LinearTF32x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        from mamba_ssm.ops.triton.linear_tf32x3 import linear_tf32x3

        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return linear_tf32x3(x, _k_contiguous(weight), bias)

    @staticmethod
    @once_differentiable  # (a second derivative through it raises instead of coming out wrong)
    def backward(ctx, dout):
        from mamba_ssm.ops.triton.linear_tf32x3 import linear_tf32x3

        x, weight = ctx.saved_tensors
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            dx = linear_tf32x3(dout, weight.t().contiguous())
        if ctx.needs_input_grad[1]:
            dweight = dout.reshape(-1, dout.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dout.sum((0, 1))
        return dx, dweight, dbias
