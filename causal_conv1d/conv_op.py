"""The (multi-direction) causal conv1d as torch.library custom ops, so torch.compile and FlopCounterMode
see one op. Same stacked form as the kernels (triton_causal_conv1d.py):

    x (b, d, L); weight (R, d, K); bias (R, d) or None; mask (b, L) or None; gate_skip (b, R) or None
    -> out (R, b, d, L): direction 0 causal, direction 1 anti-causal (the causal conv of the reversed
       sequence, in original order); channels-last memory when channels_last_out

Callers use conv_apply: the custom ops when torch.compile or a dispatch mode (FLOP counting) watches, the
implementations directly otherwise (eager: no dispatcher overhead). CUDA tensors run the Triton kernels,
other devices the PyTorch implementation with the same contract (cpu_causal_conv1d.py). FLOPs: 2 per MAC
(torch's convention) over (L + K - 1) * d * K MACs per sample and direction (dyvm/flops.py's count for
the padded conv); backward twice the forward.
"""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from causal_conv1d import cpu_causal_conv1d
from causal_conv1d.kernel_utils import needs_grad, ops_watched, triton_enabled

_EMPTY = (0,)


def _implementation(x: Tensor):
    """The module with conv_forward / conv_backward for tensor `x`: the Triton kernels or the PyTorch one."""
    if triton_enabled(x, "causal_conv1d.triton_causal_conv1d"):
        from causal_conv1d import triton_causal_conv1d

        return triton_causal_conv1d
    return cpu_causal_conv1d


def _grad_dtype(x: Tensor) -> torch.dtype:
    """dtype of the weight and bias gradients: fp32 (fp64 on the PyTorch implementation for fp64 inputs)."""
    return torch.float64 if x.dtype == torch.float64 and _implementation(x) is cpu_causal_conv1d else torch.float32


def _alloc(x: Tensor, R: int, channels_last_out: bool) -> Tensor:
    batch, dim, seqlen = x.shape
    if channels_last_out:
        return x.new_empty((R, batch, seqlen, dim)).transpose(2, 3)
    return x.new_empty((R, batch, dim, seqlen))


def _stacked_ref(x, weight, bias, mask, silu):
    """The op's definition on F.conv1d (one direction at a time, direction 1 on flipped copies): the
    reference the implementations are tested against."""
    width = weight.shape[-1]
    m = None if mask is None else mask[:, None].to(x.dtype)
    xm = x if m is None else x * m
    outs = []
    for r in range(weight.shape[0]):
        xi = xm.flip(-1) if r == 1 else xm
        y = F.conv1d(xi.to(weight.dtype), weight[r].unsqueeze(1), None if bias is None else bias[r],
                     padding=width - 1, groups=x.shape[1])[..., :x.shape[-1]]
        y = F.silu(y) if silu else y
        y = y.flip(-1) if r == 1 else y
        outs.append(y if m is None else y * m)
    return torch.stack(outs).to(x.dtype)


def conv_fwd_impl(x, weight, bias, mask, gate_skip, silu, channels_last_out):
    """The implementation of conv_fwd (conv_apply calls it directly in eager mode)."""
    out = _alloc(x, weight.shape[0], channels_last_out)
    return _implementation(x).conv_forward(x, weight, bias, mask, silu, out, gate=gate_skip)


@torch.library.custom_op("causal_conv1d::conv_fwd", mutates_args=())
def conv_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], gate_skip: Optional[Tensor],
             silu: bool, channels_last_out: bool) -> Tensor:
    return conv_fwd_impl(x, weight, bias, mask, gate_skip, silu, channels_last_out)


@conv_fwd.register_fake
def _(x, weight, bias, mask, gate_skip, silu, channels_last_out):
    return _alloc(x, weight.shape[0], channels_last_out)


def conv_bwd_impl(x, weight, bias, mask, silu, dout, mask_grad, mixer_grads=None, lengths=None):
    """The implementation of conv_bwd. mixer_grads (eager training; mamba_ssm.ops.bimamba_stacked.MixerGrads):
    its half(0) is the memory dx goes to, which the kernel writes (the PyTorch implementation ignores it)."""
    impl = _implementation(x)
    kw = {"dx_out": mixer_grads.half(0)} if mixer_grads is not None and impl is not cpu_causal_conv1d else {}
    if lengths is not None and impl is not cpu_causal_conv1d:  # (a hint: the PyTorch implementation needs none)
        kw["lengths"] = lengths
    dx, dw, db, dmask = impl.conv_backward(x, weight, bias, mask, silu, dout, mask_grad=mask_grad, **kw)
    empty = x.new_empty(_EMPTY, dtype=_grad_dtype(x))
    return [dx, dw, db if db is not None else empty, dmask if dmask is not None else empty]


@torch.library.custom_op("causal_conv1d::conv_bwd", mutates_args=())
def conv_bwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], silu: bool,
             dout: Tensor, mask_grad: bool) -> List[Tensor]:
    """[dx (x's dtype and layout, see dx_like), dweight, dbias (empty without bias), dmask (b, L) (empty unless
    mask_grad and a mask is given)] in fp32 (_grad_dtype)."""
    return conv_bwd_impl(x, weight, bias, mask, silu, dout, mask_grad)


@conv_bwd.register_fake
def _(x, weight, bias, mask, silu, dout, mask_grad):
    f = _grad_dtype(x)
    empty = x.new_empty(_EMPTY, dtype=f)
    db = bias.new_empty(bias.shape, dtype=f) if bias is not None else empty
    dmask = mask.new_empty(mask.shape, dtype=f) if mask_grad and mask is not None else empty
    return [cpu_causal_conv1d.dx_like(x), weight.new_empty(weight.shape, dtype=f), db, dmask]


def _setup(ctx, inputs, output):
    x, weight, bias, mask, _, silu, _ = inputs
    ctx.save_for_backward(x, weight, bias, mask)
    ctx.silu = silu


def _backward(ctx, dout, bwd=conv_bwd):
    """The gradients of x, weight, bias and, when it needs one, the mask: in DyVM training the token mask holds
    the straight-through keep decisions, so the predictors learn through it (as in the authors' code, where
    x * mask is plain autograd); the implementations compute it in the same pass as the others."""
    x, weight, bias, mask = ctx.saved_tensors
    mask_grad = mask is not None and ctx.needs_input_grad[3]
    dx, dw, db, dmask = bwd(x, weight, bias, mask, ctx.silu, dout, mask_grad)
    return (dx.to(x.dtype), dw.to(weight.dtype), None if bias is None else db.to(bias.dtype),
            dmask.to(mask.dtype) if mask_grad else None, None, None, None)


conv_fwd.register_autograd(_backward, setup_context=_setup)


class _EagerConv(torch.autograd.Function):
    """conv_fwd's autograd formula over the implementations, for eager training (no dispatcher)."""

    @staticmethod
    def forward(ctx, mixer_grads, lengths, *args):
        out = conv_fwd_impl(*args)
        _setup(ctx, args, out)
        ctx.mixer_grads = mixer_grads  # (kept after the backward: a retained graph's next one uses it again)
        ctx.lengths = lengths
        return out

    @staticmethod
    def backward(ctx, dout):
        shared, lengths = ctx.mixer_grads, ctx.lengths
        return None, None, *_backward(ctx, dout,
                                      bwd=lambda *a: conv_bwd_impl(*a, mixer_grads=shared, lengths=lengths))


def conv_apply(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
               gate_skip: Optional[Tensor], silu: bool, channels_last_out: bool, mixer_grads=None,
               lengths: Optional[Tensor] = None) -> Tensor:
    """Run conv_fwd the cheapest way that keeps what is watching: the custom op under torch.compile or a
    dispatch mode (FLOP counting), else its implementation, under an autograd.Function when a gradient is
    needed (see causal_conv1d.kernel_utils.ops_watched). mixer_grads: see conv_bwd_impl (eager training only).
    lengths (eager training): where the mask and the output gradient are 0 from lengths[b] on, the backward
    kernel skips work there with the same result; the custom ops go without it."""
    args = (x, weight, bias, mask, gate_skip, silu, channels_last_out)
    if ops_watched():
        return conv_fwd(*args)
    if needs_grad(x, weight, bias, mask):
        return _EagerConv.apply(mixer_grads, lengths, *args)
    return conv_fwd_impl(*args)


def conv_macs(x_shape, weight_shape) -> int:
    batch, dim, seqlen = x_shape
    R, _, width = weight_shape
    return R * batch * (seqlen + width - 1) * dim * width


@register_flop_formula(torch.ops.causal_conv1d.conv_fwd)
def _conv_fwd_flops(x_shape, weight_shape, *args, **kwargs) -> int:
    return 2 * conv_macs(x_shape, weight_shape)


@register_flop_formula(torch.ops.causal_conv1d.conv_bwd)
def _conv_bwd_flops(x_shape, weight_shape, *args, **kwargs) -> int:
    return 4 * conv_macs(x_shape, weight_shape)
