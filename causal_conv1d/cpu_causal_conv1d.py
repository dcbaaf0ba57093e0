"""The stacked causal conv1d's CPU implementation: forward and analytic backward, the Triton kernels' contract
(causal_conv1d/triton_causal_conv1d.py, conv_forward / conv_backward), so the custom ops causal_conv1d::conv_fwd
/ conv_bwd run it for the tensors the kernels do not take (CPU):

    x (b, d, L); weight (R, d, K); bias (R, d) or None; mask (b, L) or None
    out[r] = m * act(bias[r] + sum_k weight[r, :, k] * (m * x) shifted), m the mask (1 without one);
    direction 0 causal (taps t-K+1 .. t), direction 1 anti-causal (taps t .. t+K-1: the causal conv of the
    reversed sequence, in original order, so nothing is flipped).

Plain PyTorch in the channels-last layout (b, L, d) of the Vim mixer's input: each tap of each direction is
one multiply-add of a shifted slice of a zero-padded copy of x by a per-channel weight, vectorised over
channels; the backward recomputes the pre-activations (cheap) and runs the same taps transposed; weight
and bias gradients are column sums of (b * L, d) products. No oneDNN depthwise convolution (its backward
took 3 ms per call at the demo's shapes against well under 1 ms for these ops).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _tap_offsets(R: int, width: int):
    """Start in the padded sequence (K-1 zeros on each side) of the slice that tap k of direction r reads."""
    return [[k if r == 0 else 2 * (width - 1) - k for k in range(width)] for r in range(R)]


def _padded(x: Tensor, mask: Optional[Tensor], width: int, dtype: torch.dtype) -> Tensor:
    """(b, d, L) -> (b, L + 2(K-1), d) in `dtype`: the masked input, channels last, zero-padded in time."""
    batch, dim, seqlen = x.shape
    pad = width - 1
    xp = x.new_zeros((batch, seqlen + 2 * pad, dim), dtype=dtype)
    body = xp[:, pad:pad + seqlen]
    body.copy_(x.transpose(1, 2))
    if mask is not None:
        body.mul_(mask.to(dtype).unsqueeze(-1))
    return xp


def _pre_activation(xp: Tensor, weight: Tensor, bias: Optional[Tensor], seqlen: int,
                    out: Optional[Tensor] = None) -> Tensor:
    """-> (R, b, L, d) (into `out` if given): bias + sum over taps of weight * shifted input."""
    R, _, width = weight.shape
    batch, _, dim = xp.shape
    w = _taps(weight, xp.dtype)
    pre = xp.new_empty((R, batch, seqlen, dim)) if out is None else out
    for r, offsets in enumerate(_tap_offsets(R, width)):
        for k, s in enumerate(offsets):
            tap = xp[:, s:s + seqlen]
            if k == 0 and bias is not None:
                torch.addcmul(bias[r].to(xp.dtype), tap, w[r, k], out=pre[r])
            elif k == 0:
                torch.mul(tap, w[r, k], out=pre[r])
            else:
                pre[r].addcmul_(tap, w[r, k])
    return pre


def _taps(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """(R, d, K) -> (R, K, d) contiguous: each tap's per-channel weights contiguous, so that the multiply-adds
    vectorise over channels (a strided weight vector makes them several times slower)."""
    return weight.to(dtype).transpose(1, 2).contiguous()


def dx_like(x: Tensor) -> Tensor:
    """The input gradient's memory, as the Triton kernel lays it out: channel-contiguous for a channel-
    contiguous x (the Vim mixer's), else (b, d, L) contiguous."""
    batch, dim, seqlen = x.shape
    if x.stride(1) == 1:
        return x.new_empty((batch, seqlen, dim)).transpose(1, 2)
    return x.new_empty((batch, dim, seqlen))


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def conv_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], silu: bool,
                 out: Tensor, gate: Optional[Tensor] = None) -> Tensor:
    """x: (b, d, L) view; weight: (R, d, K); bias: (R, d) or None; mask: (b, L) or None; out: (R, b, d, L)
    view, written. gate: accepted for the kernels' signature; every (sample, direction) is computed (the
    scan gives a gated-off one's output 0 whatever it reads)."""
    seqlen = x.shape[-1]
    cdt = _compute_dtype(x)
    xp = _padded(x, mask, weight.shape[-1], cdt)
    direct = out.dtype == cdt and out.transpose(2, 3).is_contiguous()  # channels-last out: taps write into it
    y = _pre_activation(xp, weight, bias, seqlen, out.transpose(2, 3) if direct else None)
    if silu:
        y = F.silu(y, inplace=True)
    if mask is not None:
        y.mul_(mask.to(y.dtype)[None, :, :, None])
    if not direct:
        out.copy_(y.transpose(2, 3))
    return out


def conv_backward(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], silu: bool,
                  dout: Tensor, mask_grad: bool = False):
    """Gradients of conv_forward: dx (x's dtype, laid out by dx_like); dweight (R, d, K) and dbias (R, d) or
    None in fp32 (fp64 for fp64 inputs); dmask (b, L) in the same dtype when mask_grad and a mask is given,
    else None. dout: (R, b, d, L) view.

    The mask multiplies the input and every output (out_r = m * act_r(conv_r(x * m))), so
    dmask[t] = sum_d x[t] * dxm[t] + sum_{r, d} dout_r[t] * act_r[t], with dxm the gradient of the masked
    input (dx before its multiplication by m), x and dout the raw (unmasked) tensors."""
    batch, dim, seqlen = x.shape
    R, _, width = weight.shape
    cdt = _compute_dtype(x)
    mask_grad = mask_grad and mask is not None
    xp = _padded(x, mask, width, cdt)
    dout_t = dout.transpose(2, 3).to(cdt)  # (R, b, L, d)
    m = None if mask is None else mask.to(cdt)[None, :, :, None]
    g = dout_t if m is None else dout_t * m
    dmask = None
    if silu or mask_grad:
        act = _pre_activation(xp, weight, bias, seqlen)
    if silu:
        sig = torch.sigmoid(act)
        act.mul_(sig)  # silu(p)
        # silu'(p) = sig (1 + p (1 - sig)) = sig - silu(p) sig + silu(p), in place on sig
        g = sig.addcmul_(act, sig, value=-1).add_(act).mul_(g)
    if mask_grad:  # the output term: dout_r * act_r summed over directions and channels
        dmask = torch.mul(dout_t, act).sum((0, 3))
    w = _taps(weight, cdt)
    dxp = torch.zeros_like(xp)
    dw = torch.empty((R, dim, width), dtype=cdt, device=x.device)
    rows = batch * seqlen
    prod = torch.empty((batch, seqlen, dim), dtype=cdt, device=x.device)
    for r, offsets in enumerate(_tap_offsets(R, width)):
        for k, s in enumerate(offsets):
            dxp[:, s:s + seqlen].addcmul_(g[r], w[r, k])
            torch.sum(torch.mul(xp[:, s:s + seqlen], g[r], out=prod).view(rows, dim), 0, out=dw[r, :, k])
    pad = width - 1
    dx = dxp[:, pad:pad + seqlen]  # the gradient of the masked input, (b, L, d)
    if mask_grad:  # the input term: x * dxm summed over channels
        dmask += torch.mul(x.transpose(1, 2), dx, out=prod).sum(-1)
    if m is not None:
        dx = dx * m[0]
    dbias = g.reshape(R, rows, dim).sum(1) if bias is not None else None
    dx_out = dx_like(x)
    dx_out.copy_(dx.transpose(1, 2))
    return dx_out, dw, dbias, dmask
