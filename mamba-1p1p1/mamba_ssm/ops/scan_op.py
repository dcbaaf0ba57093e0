"""The selective scan as torch.library custom ops, so torch.compile and FlopCounterMode see one op.

`mamba_ssm::scan_fwd` / `mamba_ssm::scan_bwd` take the stacked-directions form of the Triton kernels
(mamba_ssm/ops/triton/selective_scan.py): R = 1 is selective_scan_fn, R = 2 the DyVM bidirectional scan
(direction 1 runs in reverse time; per-sample gates; the directions summed and scaled into one output).

    u, delta: (R, b, d, L); A: (R, d, N) fp32; B, C: (R, b, G, N, L); D, delta_bias: (R, d) fp32 or None;
    z: (b, d, L) or None; gate: (b, R) or None
    out (b, d, L) in u's dtype = scale * sum_r gate[:, r] * y_r;  last (R, b, d, N) fp32 if want_last;
    ckpt: with want_ckpt (a backward will follow) and the kernels, the states every CKPT_CHUNK steps that
    the backward kernel starts from, saved for it (R, b, n_chunks, N, d) fp32; else empty
    lengths: (b,) int32 or None: sample b's sequence is its first lengths[b] positions; nothing after them
    is computed (direction 1 starts at lengths[b] - 1), out and the per-position gradients there are 0. DyVM's
    training sequences end in masked tokens, which change nothing before them (dyvm.models.dyvm).

Callers use scan_apply: the custom ops when torch.compile or a dispatch mode (FLOP counting) watches, the
implementations directly otherwise (eager: no dispatcher overhead, an autograd.Function when a gradient is
needed). CUDA tensors run the Triton kernels (mamba_ssm/ops/triton/selective_scan.py), other devices the
PyTorch implementation with the same contract (mamba_ssm/ops/cpu/selective_scan.py): the same ops, the
same analytic backward and the same FLOP formulas on every device.

FLOPs for FlopCounterMode follow torch's convention (2 per multiply-accumulate) over the MAC count of the
selective scan, 9*b*L*d*N + 2*b*L*d per direction. Gates are not visible at trace time, so every direction
is counted; the backward counts twice the forward.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from mamba_ssm.ops.cpu import selective_scan as cpu_scan
from mamba_ssm.ops.dispatch import kept_in, needs_grad, ops_watched, triton_enabled

_EMPTY = (0,)


def _is_triton(t: Tensor) -> bool:
    return triton_enabled(t, "selective_scan")


def _implementation(t: Tensor):
    """The module with scan_forward / scan_backward for tensor `t`: the Triton kernels or the PyTorch one."""
    if _is_triton(t):
        from mamba_ssm.ops.triton import selective_scan

        return selective_scan
    return cpu_scan


def _state_dtype(u: Tensor) -> torch.dtype:
    """dtype of the last state, the checkpoint and the fp32 gradients: fp32 (fp64 on the PyTorch
    implementation for fp64 inputs)."""
    return torch.float64 if u.dtype == torch.float64 and not _is_triton(u) else torch.float32


def _out_like(u: Tensor, channels_last_out: bool) -> Tensor:
    _, batch, dim, seqlen = u.shape
    if channels_last_out:
        return u.new_empty((batch, seqlen, dim)).transpose(1, 2)
    return u.new_empty((batch, dim, seqlen))


def scan_fwd_impl(u, delta, A, B, C, D, z, delta_bias, gate, delta_softplus, scale, want_last, channels_last_out,
                  want_ckpt=False, lengths=None):
    """The implementation of scan_fwd (scan_apply calls it directly in eager mode)."""
    out = _out_like(u, channels_last_out)
    last, ckpt = _implementation(u).scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, gate, scale,
                                                 out, want_last, want_ckpt, lengths=lengths)
    f = _state_dtype(u) if not (want_last and want_ckpt) else None  # (once: it reads the environment)
    empty = lambda: u.new_empty(_EMPTY, dtype=f)  # noqa: E731  (outputs must not alias)
    return out, last if want_last else empty(), ckpt if want_ckpt else empty()


@torch.library.custom_op("mamba_ssm::scan_fwd", mutates_args=())
def scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
             delta_bias: Optional[Tensor], gate: Optional[Tensor], delta_softplus: bool, scale: float,
             want_last: bool, channels_last_out: bool, want_ckpt: bool = False,
             lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    return scan_fwd_impl(u, delta, A, B, C, D, z, delta_bias, gate, delta_softplus, scale, want_last,
                         channels_last_out, want_ckpt, lengths)


@scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, gate, delta_softplus, scale, want_last, channels_last_out,
      want_ckpt=False, lengths=None):
    R, batch, dim, seqlen = u.shape
    d_state = A.shape[-1]
    last_shape = (R, batch, dim, d_state) if want_last else _EMPTY
    if not want_ckpt:
        ckpt_shape = _EMPTY
    elif _is_triton(u):
        from mamba_ssm.ops.triton.selective_scan import CKPT_CHUNK

        ckpt_shape = (R, batch, -(-seqlen // CKPT_CHUNK), d_state, dim)
    else:
        ckpt_shape = (cpu_scan.checkpoint_numel(R, batch, dim, seqlen, d_state),)
    f = _state_dtype(u)
    return _out_like(u, channels_last_out), u.new_empty(last_shape, dtype=f), u.new_empty(ckpt_shape, dtype=f)


def scan_bwd_impl(u, delta, A, B, C, D, z, delta_bias, gate, delta_softplus, scale, dout, dlast, ckpt=None,
                  lengths=None, mixer_grads=None):
    """The implementation of scan_bwd. mixer_grads (eager training; mamba_ssm.ops.bimamba_stacked.MixerGrads):
    its half(1) is the memory dz goes to, and its projection slots of B and C those dB and dC go to, which the
    kernels write (the PyTorch implementation ignores them)."""
    kw = {}
    if mixer_grads is not None and _is_triton(u):
        if z is not None:
            kw["dz_out"] = mixer_grads.half(1)
        bc_out = (mixer_grads.projection_slot(B), mixer_grads.projection_slot(C))
        if None not in bc_out:
            kw["bc_out"] = bc_out
    g = _implementation(u).scan_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, gate, scale, dout,
                                         dlast, ckpt if ckpt is not None and ckpt.numel() else None,
                                         lengths=lengths, **kw)
    names = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias", "dgate")
    return [g[n] if g[n] is not None else u.new_empty(_EMPTY, dtype=_state_dtype(u)) for n in names]


@torch.library.custom_op("mamba_ssm::scan_bwd", mutates_args=())
def scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
             delta_bias: Optional[Tensor], gate: Optional[Tensor], delta_softplus: bool, scale: float, dout: Tensor,
             dlast: Optional[Tensor], ckpt: Optional[Tensor] = None,
             lengths: Optional[Tensor] = None) -> List[Tensor]:
    """Returns [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dgate]: du, ddelta, dz in the dtypes of u, delta
    and z (channel-contiguous), the others fp32 (see _state_dtype); empty tensors for absent inputs."""
    grads = scan_bwd_impl(u, delta, A, B, C, D, z, delta_bias, gate, delta_softplus, scale, dout, dlast, ckpt,
                          lengths)
    # (a custom op's returns must not share memory: the kernels' dD and ddelta_bias are halves of one sum)
    seen = set()
    for i, g in enumerate(grads):
        if g.numel():
            where = g.untyped_storage().data_ptr()
            grads[i] = g.clone() if where in seen else g
            seen.add(where)
    return grads


@scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, gate, delta_softplus, scale, dout, dlast, ckpt=None, lengths=None):
    f = _state_dtype(u)
    like = lambda t: t.new_empty(t.shape, dtype=f) if t is not None else u.new_empty(_EMPTY, dtype=f)  # noqa

    def same(t):  # the kernel's du / ddelta / dz: the input's dtype, channel-contiguous (see scan_backward)
        if t is None:
            return u.new_empty(_EMPTY, dtype=f)
        return t.new_empty((*t.shape[:-2], t.shape[-1], t.shape[-2])).transpose(-1, -2)
    return [same(u), same(delta), like(A), like(B), like(C), like(D), same(z), like(delta_bias), like(gate)]


def _setup(ctx, inputs, output, rebuild_from: Optional[tuple] = None):
    """rebuild_from (eager training): the tensors the mixer recomputes u and delta from, saved in their place
    (mamba_ssm.ops.bimamba_stacked.MixerGrads)."""
    u, delta, A, B, C, D, z, delta_bias, gate, delta_softplus, scale, want_last = inputs[:12]
    lengths = inputs[14] if len(inputs) > 14 else None
    if rebuild_from is not None:
        u = delta = None
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, gate, output[2], lengths, *(rebuild_from or ()))
    ctx.delta_softplus, ctx.scale, ctx.want_last = delta_softplus, scale, want_last
    # No zero-filled gradients for the outputs nothing differentiates (the checkpoint: a zero tensor of its
    # size per call was 9% of a CPU training step of the demo): they arrive as None.
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlast, dckpt, bwd=scan_bwd, rebuild=None):
    saved = ctx.saved_tensors
    u, delta, A, B, C, D, z, delta_bias, gate, ckpt, lengths = saved[:11]
    if rebuild is not None:
        u, delta = rebuild(*saved[11:])
    if dout is None:
        dout = u.new_zeros(u.shape[1:])
    args = (u, delta, A, B, C, D, z, delta_bias, gate, ctx.delta_softplus, ctx.scale, dout,
            dlast if ctx.want_last else None)
    grads = bwd(*args, ckpt, lengths)
    cast = [None if t is None else g.to(t.dtype) for g, t in zip(grads, (u, delta, A, B, C, D, z, delta_bias, gate))]
    return (*cast, None, None, None, None, None, None)


scan_fwd.register_autograd(_backward, setup_context=_setup)


class _EagerScan(torch.autograd.Function):
    """scan_fwd's autograd formula over the implementations, for eager training (no dispatcher)."""

    @staticmethod
    def forward(ctx, mixer_grads, *args):
        out = scan_fwd_impl(*args)
        rebuild_from = mixer_grads.take_rebuild_tensors() if mixer_grads is not None else None
        ctx.rebuilt_inputs = rebuild_from is not None
        _setup(ctx, args, out, rebuild_from)
        ctx.mark_non_differentiable(out[2])
        ctx.mixer_grads = mixer_grads  # (kept after the backward: a retained graph's next one hands off again)
        return out

    @staticmethod
    def backward(ctx, dout, dlast, dckpt):
        shared = ctx.mixer_grads
        grads = _backward(ctx, dout, dlast, dckpt, bwd=lambda *a: scan_bwd_impl(*a, mixer_grads=shared),
                          rebuild=shared.scan_inputs if ctx.rebuilt_inputs else None)
        if shared is not None and shared.du_wanted:  # u's gradient goes on through it (x_proj adds into it)
            shared.du, grads = grads[0], (None, *grads[1:])
        return None, *grads


def scan_apply(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
               delta_bias: Optional[Tensor], gate: Optional[Tensor], delta_softplus: bool, scale: float,
               want_last: bool, channels_last_out: bool, want_ckpt: bool = False,
               mixer_grads=None, lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Run scan_fwd the cheapest way that keeps what is watching: the custom op under torch.compile or a
    dispatch mode (FLOP counting), else its implementation, under an autograd.Function when a gradient is
    needed (see mamba_ssm.ops.dispatch: needs_grad, ops_watched). mixer_grads: see scan_bwd_impl (eager training)."""
    args = (u, delta, A, B, C, D, z, delta_bias, gate, delta_softplus, scale, want_last, channels_last_out,
            want_ckpt, lengths)
    if ops_watched():
        return scan_fwd(*args)
    if needs_grad(u, delta, A, B, C, D, z, delta_bias, gate):
        return _EagerScan.apply(mixer_grads, *args)
    return scan_fwd_impl(*args)


def scan_output(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                z: Optional[Tensor], delta_bias: Optional[Tensor], gate: Optional[Tensor], delta_softplus: bool,
                scale: float, channels_last_out: bool, want_ckpt: bool = False, mixer_grads=None,
                lengths: Optional[Tensor] = None, weights_memo: Optional[dict] = None) -> Tensor:
    """scan_apply's output alone (no last state). In eager inference the implementation just writes a fresh
    output: none of the op's placeholder outputs, each an allocation the host pays on every layer.
    weights_memo: inference's cached weights' memo (StackedWeights.memo), where A is kept in the memory order
    the kernel reads (_A_as_read)."""
    if ops_watched() or needs_grad(u, delta, A, B, C, D, z, delta_bias, gate):
        return scan_apply(u, delta, A, B, C, D, z, delta_bias, gate, delta_softplus, scale, False, channels_last_out,
                          want_ckpt, mixer_grads, lengths)[0]
    out = _out_like(u, channels_last_out)
    implementation = _implementation(u)
    if implementation is not cpu_scan and weights_memo is not None:
        A = _A_as_read(implementation, u, A, weights_memo)
    implementation.scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, gate, scale, out, False,
                                False, lengths=lengths)
    return out


def _A_as_read(kernels, u: Tensor, A: Tensor, memo: dict) -> Tensor:
    """A (R, d, N) laid out as the scan kernel reads it for inputs like u (kernels.A_in_kernel_order). The stacked
    weights hold A (R, N, d)-contiguous, the order of the 16-bit kernels on the mixer's layout; the fp32 ones read
    (R, d, N), which scan_forward would copy at every call (a launch a layer): the copy is made once and kept in the
    memo (not from inside a CUDA-graph capture, whose tensors hold values only once it replays)."""
    lanes_on_channels = kernels.forward_lanes_on_channels(u)
    if kernels.A_in_kernel_layout(A, lanes_on_channels):
        return A
    layout = "A (R, N, d)" if lanes_on_channels else "A (R, d, N)"  # (its memory order, as the memo's key)
    return kept_in(memo, layout, lambda: kernels.A_in_kernel_order(A, lanes_on_channels), A)


def scan_macs(u_shape, d_state: int) -> int:
    """Multiply-accumulates of the scan: 9*b*L*d*N + 2*b*L*d per direction."""
    R, batch, dim, seqlen = u_shape
    return R * (9 * batch * seqlen * dim * d_state + 2 * batch * seqlen * dim)


@register_flop_formula(torch.ops.mamba_ssm.scan_fwd)
def _scan_fwd_flops(u_shape, delta_shape, A_shape, *args, **kwargs) -> int:
    return 2 * scan_macs(u_shape, A_shape[-1])


@register_flop_formula(torch.ops.mamba_ssm.scan_bwd)
def _scan_bwd_flops(u_shape, delta_shape, A_shape, *args, **kwargs) -> int:
    return 4 * scan_macs(u_shape, A_shape[-1])
