"""The fused residual-add + RMSNorm / LayerNorm on CPU: layer_norm_ref's semantics (see ops/triton/layernorm.py)
as one autograd.Function with an analytic backward, instead of a dozen small autograd nodes and their
temporaries (half the time of the reference's forward + backward at the demo's shapes).

    r = x + residual (fp32), residual_out = r (fp32 if residual_in_fp32, else x's dtype),
    out = (r - mean(r) if LayerNorm) * rstd * weight (+ bias) in fp32, cast to x's dtype,
    rstd = 1 / sqrt(mean((r - mean(r))^2 or r^2) + eps) per row.
Backward with x_hat = normalised r and g = dout * weight:
    d r = rstd * (g - x_hat * mean(g x_hat)) for RMSNorm, rstd * (g - mean(g) - x_hat * mean(g x_hat)) for
    LayerNorm, plus the gradient of residual_out; d weight = sum dout x_hat, d bias = sum dout.
"""
from typing import Optional

import torch
from torch import Tensor


class FusedAddNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], eps: float,
                prenorm: bool, residual_in_fp32: bool, is_rms_norm: bool):
        r = x.float() if residual is None else x.float() + residual.float()
        if is_rms_norm:
            rstd = torch.rsqrt(r.square().mean(-1, keepdim=True).add_(eps))
            x_hat = r * rstd
        else:
            x_hat = r - r.mean(-1, keepdim=True)
            rstd = torch.rsqrt(x_hat.square().mean(-1, keepdim=True).add_(eps))
            x_hat.mul_(rstd)
        out = x_hat * weight.float()
        if bias is not None:
            out.add_(bias.float())
        ctx.save_for_backward(x_hat, rstd, weight)
        ctx.meta = (x.dtype, None if residual is None else residual.dtype, bias is not None, is_rms_norm)
        ctx.set_materialize_grads(False)
        out = out.to(x.dtype)
        if not prenorm:
            return out
        residual_out = r.to(torch.float32 if residual_in_fp32 else x.dtype)
        if residual_out is x:  # an output must not be an input (first layer, fp32, no residual)
            residual_out = x.clone()
        return out, residual_out

    @staticmethod
    def backward(ctx, dout: Optional[Tensor], dres_out: Optional[Tensor] = None):
        x_hat, rstd, weight = ctx.saved_tensors
        x_dtype, res_dtype, has_bias, is_rms_norm = ctx.meta
        dr = dw = db = None
        if dout is not None:
            dout = dout.float()
            rows = dout.reshape(-1, dout.shape[-1])
            dw = (rows * x_hat.reshape(rows.shape)).sum(0).to(weight.dtype)
            db = rows.sum(0).to(weight.dtype) if has_bias else None
            g = dout * weight.float()
            dr = g - x_hat * (g * x_hat).mean(-1, keepdim=True)
            if not is_rms_norm:
                dr -= g.mean(-1, keepdim=True)
            dr.mul_(rstd)
        if dres_out is not None:
            dr = dres_out.float() if dr is None else dr.add_(dres_out)
        if dr is None:
            return (None,) * 8
        return (dr.to(x_dtype), dw, db, None if res_dtype is None else dr.to(res_dtype), None, None, None, None)


def layer_norm_cpu(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor] = None,
                   eps: float = 1e-6, prenorm: bool = False, residual_in_fp32: bool = False,
                   is_rms_norm: bool = False):
    """layer_norm_fn's CPU implementation (arguments checked by the caller)."""
    return FusedAddNorm.apply(x, weight, bias, residual, eps, prenorm, residual_in_fp32, is_rms_norm)
