"""The selective scan as torch.library custom ops, so torch.compile and FlopCounterMode see one op.

`mamba_ssm::scan_fwd` / `mamba_ssm::scan_bwd` take the stacked-directions form of the Triton kernels
(mamba_ssm/ops/triton/selective_scan.py): R = 1 is selective_scan_fn, R = 2 the DyVM bidirectional scan
(direction 1 runs in reverse time; per-sample gates; the directions summed and scaled into one output).

    u, delta: (R, b, d, L); A: (R, d, N) fp32; B, C: (R, b, G, N, L); D, delta_bias: (R, d) fp32 or None;
    z: (b, d, L) or None; gate: (b, R) or None
    out (b, d, L) in u's dtype = scale * sum_r gate[:, r] * y_r;  last (R, b, d, N) fp32 if want_last;
    ckpt: with want_ckpt (a backward will follow) and the kernels, the states every CKPT_CHUNK steps that
    the backward kernel starts from, saved for it (R, b, n_chunks, N, d) fp32; else empty

Callers use scan_apply: the custom ops when torch.compile or a dispatch mode (FLOP counting) watches, the
implementations directly otherwise (eager: no dispatcher overhead, an autograd.Function when a gradient is
needed). CUDA tensors run the Triton kernels; other devices
run the PyTorch reference (and the backward recomputes
it under autograd, outside the op: autograd does not run inside a custom op). The public functions use these ops on CUDA only: on CPU they call the
reference directly, which keeps its own analytic backward and is faster there.

FLOPs for FlopCounterMode follow torch's convention (2 per multiply-accumulate) over the MAC count of
docs/reference.md section 4: 9*b*L*d*N + 2*b*L*d per direction. Gates are not visible at trace time, so every direction
is counted; the backward counts twice the forward.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from mamba_ssm.ops.dispatch import needs_grad, ops_watched

_EMPTY = (0,)


def _is_triton(t: Tensor) -> bool:
    from mamba_ssm.ops.dispatch import triton_enabled

    return triton_enabled(t, "selective_scan")


def _stacked_ref(u, delta, A, B, C, D, z, delta_bias, gate, delta_softplus, scale, want_last):
    """Reference of the stacked op, built on selective_scan_ref (differentiable)."""
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    R = u.shape[0]
    out, lasts = None, []
    for r in range(R):
        flip = (lambda t: t.flip(-1)) if r == 1 else (lambda t: t)  # noqa: E731
        y, last = selective_scan_ref(flip(u[r]), flip(delta[r]), A[r], flip(B[r]), flip(C[r]),
                                     None if D is None else D[r], None if z is None else flip(z),
                                     None if delta_bias is None else delta_bias[r], delta_softplus, True)
        y = flip(y).float() * scale
        if gate is not None:
            y = y * gate[:, r, None, None].float()
        out = y if out is None else out + y
        lasts.append(last)
    last = torch.stack(lasts) if want_last else u.new_empty(_EMPTY, dtype=torch.float32)
    return out.to(u.dtype), last


def _out_like(u: Tensor, channels_last_out: bool) -> Tensor:
    _, batch, dim, seqlen = u.shape
    if channels_last_out:
        return torch.empty((batch, seqlen, dim), device=u.device, dtype=u.dtype).transpose(1, 2)
    return torch.empty((batch, dim, seqlen), device=u.device, dtype=u.dtype)


def scan_fwd_impl(u, delta, A, B, C, D, z, delta_bias, gate, delta_softplus, scale, want_last, channels_last_out,
                  want_ckpt=False):
    """The implementation of scan_fwd (scan_apply calls it directly in eager mode)."""
    empty = lambda: u.new_empty(_EMPTY, dtype=torch.float32)  # noqa: E731  (outputs must not alias)
    if _is_triton(u):
        from mamba_ssm.ops.triton.selective_scan import scan_forward

        out = _out_like(u, channels_last_out)
        last, ckpt = scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, gate, scale, out, want_last,
                                  want_ckpt)
        return out, last if want_last else empty(), ckpt if want_ckpt else empty()
    with torch.no_grad():
        y, last = _stacked_ref(u, delta, A, B, C, D, z, delta_bias, gate, delta_softplus, scale, want_last)
    out = _out_like(u, channels_last_out)
    out.copy_(y)
    return out, last, empty()


@torch.library.custom_op("mamba_ssm::scan_fwd", mutates_args=())
def scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
             delta_bias: Optional[Tensor], gate: Optional[Tensor], delta_softplus: bool, scale: float,
             want_last: bool, channels_last_out: bool, want_ckpt: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    return scan_fwd_impl(u, delta, A, B, C, D, z, delta_bias, gate, delta_softplus, scale, want_last,
                         channels_last_out, want_ckpt)


@scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, gate, delta_softplus, scale, want_last, channels_last_out,
      want_ckpt=False):
    from mamba_ssm.ops.triton.selective_scan import CKPT_CHUNK

    R, batch, dim, seqlen = u.shape
    d_state = A.shape[-1]
    last_shape = (R, batch, dim, d_state) if want_last else _EMPTY
    ckpt_shape = (R, batch, -(-seqlen // CKPT_CHUNK), d_state, dim) if want_ckpt and _is_triton(u) else _EMPTY
    f32 = torch.float32
    return _out_like(u, channels_last_out), u.new_empty(last_shape, dtype=f32), u.new_empty(ckpt_shape, dtype=f32)


def scan_bwd_impl(u, delta, A, B, C, D, z, delta_bias, gate, delta_softplus, scale, dout, dlast, ckpt=None):
    """The implementation of scan_bwd."""
    if not _is_triton(u):
        raise RuntimeError("mamba_ssm::scan_bwd runs the Triton kernels only; the reference backward runs "
                           "through autograd (scan_op._reference_grads)")
    from mamba_ssm.ops.triton.selective_scan import scan_backward

    g = scan_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, gate, scale, dout, dlast,
                      ckpt if ckpt is not None and ckpt.numel() else None)
    names = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias", "dgate")
    return [g[n] if g[n] is not None else u.new_empty(_EMPTY, dtype=torch.float32) for n in names]


@torch.library.custom_op("mamba_ssm::scan_bwd", mutates_args=())
def scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
             delta_bias: Optional[Tensor], gate: Optional[Tensor], delta_softplus: bool, scale: float, dout: Tensor,
             dlast: Optional[Tensor], ckpt: Optional[Tensor] = None) -> List[Tensor]:
    """Returns [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dgate]: du, ddelta, dz in the dtypes of u, delta
    and z, the others fp32; empty tensors for absent inputs.
    Kernels only: the reference's backward needs autograd, which does not run inside a custom op."""
    return scan_bwd_impl(u, delta, A, B, C, D, z, delta_bias, gate, delta_softplus, scale, dout, dlast, ckpt)


def _reference_grads(u, delta, A, B, C, D, z, delta_bias, gate, delta_softplus, scale, dout, dlast):
    """The backward of scan_fwd on devices without the kernels: autograd through the reference."""
    inputs = [t.detach().requires_grad_() if t is not None else None
              for t in (u, delta, A, B, C, D, z, delta_bias, gate)]
    with torch.enable_grad():
        out, last = _stacked_ref(*inputs, delta_softplus, scale, dlast is not None)
        outs, grads = [out], [dout.to(out.dtype)]
        if dlast is not None:
            outs.append(last)
            grads.append(dlast.float())
        wrt = [t for t in inputs if t is not None]
        got = iter(torch.autograd.grad(outs, wrt, grads, allow_unused=True))
    res = []
    for t in inputs:
        g = next(got) if t is not None else None
        if t is not None and g is None:
            g = torch.zeros_like(t)
        res.append(g)
    return res


@scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, gate, delta_softplus, scale, dout, dlast, ckpt=None):
    f32 = torch.float32
    like = lambda t: t.new_empty(t.shape, dtype=f32) if t is not None else u.new_empty(_EMPTY, dtype=f32)  # noqa

    def same(t):  # the kernel's du / ddelta / dz: the input's dtype, channel-contiguous (see scan_backward)
        if t is None:
            return u.new_empty(_EMPTY, dtype=f32)
        return t.new_empty((*t.shape[:-2], t.shape[-1], t.shape[-2])).transpose(-1, -2)
    return [same(u), same(delta), like(A), like(B), like(C), like(D), same(z), like(delta_bias), like(gate)]


def _setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, gate, delta_softplus, scale, want_last = inputs[:12]
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, gate, output[2])
    ctx.delta_softplus, ctx.scale, ctx.want_last = delta_softplus, scale, want_last


def _backward(ctx, dout, dlast, dckpt, bwd=scan_bwd):
    u, delta, A, B, C, D, z, delta_bias, gate, ckpt = ctx.saved_tensors
    args = (u, delta, A, B, C, D, z, delta_bias, gate, ctx.delta_softplus, ctx.scale, dout,
            dlast if ctx.want_last else None)
    grads = bwd(*args, ckpt) if _is_triton(u) else _reference_grads(*args)
    cast = [None if t is None else g.to(t.dtype) for g, t in zip(grads, (u, delta, A, B, C, D, z, delta_bias, gate))]
    return (*cast, None, None, None, None, None)


scan_fwd.register_autograd(_backward, setup_context=_setup)


class _EagerScan(torch.autograd.Function):
    """scan_fwd's autograd formula over the implementations, for eager training (no dispatcher)."""

    @staticmethod
    def forward(ctx, *args):
        out = scan_fwd_impl(*args)
        _setup(ctx, args, out)
        ctx.mark_non_differentiable(out[2])
        return out

    @staticmethod
    def backward(ctx, dout, dlast, dckpt):
        return _backward(ctx, dout, dlast, dckpt, bwd=scan_bwd_impl)


def scan_apply(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
               delta_bias: Optional[Tensor], gate: Optional[Tensor], delta_softplus: bool, scale: float,
               want_last: bool, channels_last_out: bool, want_ckpt: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """Run scan_fwd the cheapest way that keeps what is watching: the custom op under torch.compile or a
    dispatch mode (FLOP counting), else its implementation, under an autograd.Function when a gradient is
    needed (see mamba_ssm.ops.dispatch: needs_grad, ops_watched)."""
    args = (u, delta, A, B, C, D, z, delta_bias, gate, delta_softplus, scale, want_last, channels_last_out,
            want_ckpt)
    if ops_watched():
        return scan_fwd(*args)
    if needs_grad(u, delta, A, B, C, D, z, delta_bias, gate):
        return _EagerScan.apply(*args)
    return scan_fwd_impl(*args)


def scan_macs(u_shape, d_state: int) -> int:
    """Multiply-accumulates of the scan (docs/reference.md section 4): 9*b*L*d*N + 2*b*L*d per direction."""
    R, batch, dim, seqlen = u_shape
    return R * (9 * batch * seqlen * dim * d_state + 2 * batch * seqlen * dim)


@register_flop_formula(torch.ops.mamba_ssm.scan_fwd)
def _scan_fwd_flops(u_shape, delta_shape, A_shape, *args, **kwargs) -> int:
    return 2 * scan_macs(u_shape, A_shape[-1])


@register_flop_formula(torch.ops.mamba_ssm.scan_bwd)
def _scan_bwd_flops(u_shape, delta_shape, A_shape, *args, **kwargs) -> int:
    return 4 * scan_macs(u_shape, A_shape[-1])
