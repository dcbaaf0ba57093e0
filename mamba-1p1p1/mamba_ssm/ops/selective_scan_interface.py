"""Selective scan and the Mamba inner function, with the mamba-ssm 1.1.1 call signatures.

`selective_scan_fn` / `mamba_inner_fn` run through the custom op mamba_ssm::scan_fwd (scan_op.py): the Triton
kernels for CUDA tensors (compiled at first use), the PyTorch implementation (ops/cpu/selective_scan.py)
for other devices. MAMBA_FORCE_REFERENCE=1 sends them to the references in this file instead, which are
vectorised (see scan_core.py) and keep the state in fp32 whatever the input dtype.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from causal_conv1d import causal_conv1d_fn
from mamba_ssm.ops import scan_op  # noqa: F401  (registers the custom ops and their FLOP formulas up front)
from mamba_ssm.ops.dispatch import needs_grad, reference_forced
from mamba_ssm.ops.scan_core import SelectiveScanCore
from mamba_ssm.ops.scan_op import scan_apply


def _check_scan_args(u, delta, A, B, C, D, z, delta_bias):
    if A.is_complex():
        raise NotImplementedError("complex A is not supported (Vim and DyVM use real A)")
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, dim, seqlen); got {tuple(u.shape)} and {tuple(delta.shape)}")
    batch, dim, seqlen = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (dim={dim}, d_state), got {tuple(A.shape)}")
    d_state = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        ok = (M.dim() == 2 and M.shape == (dim, d_state)) or (
            M.dim() == 3 and M.shape == (batch, d_state, seqlen)) or (
            M.dim() == 4 and M.shape[0] == batch and M.shape[2:] == (d_state, seqlen) and dim % M.shape[1] == 0)
        if not ok:
            raise ValueError(f"{name} must be (dim, d_state), (batch, d_state, seqlen) or (batch, groups, d_state, "
                             f"seqlen) with groups dividing dim; got {tuple(M.shape)} for u {tuple(u.shape)}, "
                             f"d_state {d_state}")
    if D is not None and D.shape != (dim,):
        raise ValueError(f"D must be ({dim},), got {tuple(D.shape)}")
    if delta_bias is not None and delta_bias.shape != (dim,):
        raise ValueError(f"delta_bias must be ({dim},), got {tuple(delta_bias.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")


def _grouped(M, batch, dim, seqlen, dtype):
    """B or C in any accepted layout -> time-major (seqlen, batch, groups, 1, d_state)."""
    M = M.to(dtype)
    if M.dim() == 2:  # fixed per channel: one group per channel
        return M[None, None, :, None, :].expand(seqlen, batch, dim, 1, M.shape[1])
    if M.dim() == 3:
        M = M.unsqueeze(1)
    return M.permute(3, 0, 1, 2).unsqueeze(3)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """u, delta, z: (batch, dim, L); A: (dim, N); B, C: (dim, N), (batch, N, L) or (batch, G, N, L);
    D, delta_bias: (dim,). Returns out (batch, dim, L) in u's dtype [, last_state (batch, dim, N) fp32].

    out = (sum_n C_t h_t + D u_t) * silu(z_t), h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,
    dt = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias.
    """
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    cdt = torch.float64 if u.dtype == torch.float64 else torch.float32  # state and math in fp32 at least
    batch, dim, seqlen = u.shape
    u_c, dt = u.to(cdt), delta.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    Bg, Cg = _grouped(B, batch, dim, seqlen, cdt), _grouped(C, batch, dim, seqlen, cdt)
    groups = Bg.shape[2]
    shape = (seqlen, batch, groups, dim // groups)
    time_major = lambda t: t.permute(2, 0, 1).reshape(shape)  # noqa: E731
    y, last = SelectiveScanCore.apply(time_major(u_c), time_major(dt),
                                      A.to(cdt).reshape(groups, dim // groups, -1), Bg, Cg)
    y = y.reshape(seqlen, batch, dim).permute(1, 2, 0)
    y = y.reshape(batch, dim, seqlen)
    if D is not None:
        y = y + u_c * D.to(cdt)[:, None]
    if z is not None:
        y = y * F.silu(z.to(cdt))
    out = y.to(dtype_in)
    return (out, last.reshape(batch, dim, -1)) if return_last_state else out


def _as_stacked_bc(M: Tensor, batch: int, seqlen: int) -> Tensor:
    """B or C as accepted by selective_scan_fn -> (1, b, G, N, L) view (a fixed (dim, N) is G = dim)."""
    if M.dim() == 2:
        return M[None, None, :, :, None].expand(1, batch, M.shape[0], M.shape[1], seqlen)
    if M.dim() == 3:
        M = M.unsqueeze(1)
    return M.unsqueeze(0)


def selective_scan_op(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """selective_scan_fn through scan_op.scan_apply, on any device (arguments checked by the caller)."""
    batch, _, seqlen = u.shape
    wide = lambda t: None if t is None else (t if t.dtype == torch.float64 else t.float())[None]  # noqa: E731
    out, last, _ = scan_apply(u[None], delta[None], wide(A), _as_stacked_bc(B, batch, seqlen),
                              _as_stacked_bc(C, batch, seqlen), wide(D), z, wide(delta_bias), None, delta_softplus,
                              1.0, return_last_state, u.stride(-1) != 1,
                              needs_grad(u, delta, A, B, C, D, z, delta_bias))
    return (out, last.squeeze(0)) if return_last_state else out  # squeeze: a view, also for the gradient


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """Same contract as `selective_scan_ref`, through the custom op (see the module docstring)."""
    if reference_forced():
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    return selective_scan_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def _conv_weight_2d(w):
    return w.reshape(w.shape[0], w.shape[-1])


def _inner(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias,
           A, B, C, D, delta_bias, B_proj_bias, C_proj_bias, delta_softplus, conv_fn, scan_fn):
    delta_rank = delta_proj_weight.shape[1]
    d_state = A.shape[-1]
    x, z = xz.chunk(2, dim=1)
    x = conv_fn(x, _conv_weight_2d(conv1d_weight), conv1d_bias, activation="silu")
    x_dbl = F.linear(x.transpose(1, 2), x_proj_weight)  # (b, l, dt_rank + 2 * d_state)
    delta = (x_dbl[..., :delta_rank] @ delta_proj_weight.t()).transpose(1, 2)
    if B is None:  # input-dependent B
        B = x_dbl[..., delta_rank:delta_rank + d_state]
        if B_proj_bias is not None:
            B = B + B_proj_bias.to(B.dtype)
        B = B.transpose(1, 2).contiguous()
    if C is None:
        C = x_dbl[..., -d_state:]
        if C_proj_bias is not None:
            C = C + C_proj_bias.to(C.dtype)
        C = C.transpose(1, 2).contiguous()
    y = scan_fn(x, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)


def mamba_inner_ref(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                    out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None,
                    C_proj_bias=None, delta_softplus=True):
    """The whole Mamba mixer after in_proj: xz (batch, 2*d_inner, L) -> (batch, L, d_model)."""
    from causal_conv1d import causal_conv1d_ref

    return _inner(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                  out_proj_bias, A, B, C, D, delta_bias, B_proj_bias, C_proj_bias, delta_softplus,
                  causal_conv1d_ref, selective_scan_ref)


def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                   out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None,
                   C_proj_bias=None, delta_softplus=True):
    """Same contract as `mamba_inner_ref`, on the conv and scan ops (kernels for CUDA tensors)."""
    return _inner(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                  out_proj_bias, A, B, C, D, delta_bias, B_proj_bias, C_proj_bias, delta_softplus,
                  causal_conv1d_fn, selective_scan_fn)
