"""bimamba_v2_inner_fn on the stacked ops: both directions of a Vim v2 layer, gates and token masks, on any
device (the ops run the Triton kernels for CUDA tensors, the PyTorch implementations otherwise).

    conv (both directions, one launch, custom op causal_conv1d::conv_fwd; direction 1 anti-causal, so
    nothing is flipped)
    -> x_proj and dt_proj as batched matmuls over the direction axis (x_proj's forward in fp32 on the kernels'
       devices: three TF32 products, mamba_ssm.ops.triton.linear_tf32x3)
    -> selective scan (both directions, one launch; the custom op mamba_ssm::scan_fwd), which also applies
       D, z-gating, the per-sample gate, the sum of the directions and the halving, writing (batch, L,
       d_inner) once.

Inference with gates: a (sample, direction) whose gate is 0 is skipped inside the conv and scan kernels
(the programs return at once), and on a GPU inside the kernel that replaces the two batched matmuls
(mamba_ssm.ops.triton.gated_proj); elsewhere the matmuls run over the whole batch. Training: every direction
runs and the gate multiplies its output, so the gate gets its gradient.
"""
import functools
import math
import os
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from causal_conv1d.conv_op import conv_apply, conv_fwd_impl
from mamba_ssm.ops import linear_fp32
from mamba_ssm.ops.dispatch import graph_capturing, needs_grad, ops_watched, triton_enabled
from mamba_ssm.ops.scan_op import scan_output


def _stack(fwd, bwd, name, dtype=None, last_two_transposed=False) -> Optional[Tensor]:
    """The two directions' `name` stacked on a new leading axis; last_two_transposed: stored with the last two
    axes swapped in memory (the result is the transposed view, so its shape is the same)."""
    a, b = getattr(fwd, name), getattr(bwd, name)
    if a is None or b is None:
        if (a is None) != (b is None):
            raise ValueError(f"{name} must be given for both directions or neither")
        return None
    s = torch.stack([a.t(), b.t()]) if last_two_transposed else torch.stack([a, b])
    if dtype is not None and not (dtype == torch.float32 and s.dtype == torch.float64):  # fp64 stays exact
        s = s.to(dtype)
    return s.transpose(1, 2) if last_two_transposed else s


class StackedWeights(NamedTuple):
    """Both directions' parameters stacked on a leading axis of 2, as the kernels take them."""
    conv_weight: Tensor  # (2, d_inner, width)
    conv_bias: Optional[Tensor]  # (2, d_inner)
    x_proj_weight: Tensor  # (2, dt_rank + 2 d_state, d_inner)
    dt_proj_weight: Tensor  # (2, d_inner, dt_rank)
    A: Tensor  # (2, d_inner, d_state) fp32 (fp64 if given in fp64)
    D: Optional[Tensor]  # (2, d_inner) fp32 (or fp64)
    dt_proj_bias: Optional[Tensor]  # (2, d_inner) fp32 (or fp64)
    memo: Optional[dict] = None  # inference's cached weights: what the fp32 x_proj kernel derives (_x_proj_matmul)
    # training with 16-bit activations (stack_for_training): x_proj's and dt_proj's weights in the activations'
    # dtype, cast once and without a gradient; the two fields above stay fp32 and take the gradient (_XProj, _DtProj)
    projections: Optional[Tuple[Tensor, Tensor]] = None

    def tensors(self) -> tuple:
        """The weights (the fields before memo)."""
        return self[:7]


def stack_directions(fwd, bwd) -> StackedWeights:
    """Stack two ScanWeights (differentiable). Inference callers may cache the result (Mamba does).

    A is stacked (2, d_state, d_inner)-contiguous and returned as its transposed view (2, d_inner, d_state): the
    scan kernels on the mixer's layout read it in that memory order, which would otherwise be a copy per call
    (forward and backward) of every layer."""
    dim = fwd.A.shape[0]
    A = _stack(fwd, bwd, "A", torch.float32, last_two_transposed=True)
    return StackedWeights(_stack(fwd, bwd, "conv_weight").reshape(2, dim, -1), _stack(fwd, bwd, "conv_bias"),
                          _stack(fwd, bwd, "x_proj_weight"), _stack(fwd, bwd, "dt_proj_weight"),
                          A, _stack(fwd, bwd, "D", torch.float32), _stack(fwd, bwd, "dt_proj_bias", torch.float32))


# stack_for_training's parameters, in the order its flat buffer holds them: x_proj's and dt_proj's weights
# adjacent (one cast covers both), A_log last.
TRAINING_STACK_FIELDS = ("conv_weight", "conv_bias", "D", "dt_proj_bias", "x_proj_weight", "dt_proj_weight",
                         "A_log")


class _TrainingStack(torch.autograd.Function):
    """stack_for_training's op: 14 fp32 parameters (TRAINING_STACK_FIELDS' pairs, the forward direction's first)
    -> the stacked conv weight, conv bias, x_proj and dt_proj weights, A = -exp(A_log) (stored (2, d_state, d_inner),
    returned as its transposed view), D and dt_proj bias: StackedWeights' order; then x_proj's and dt_proj's weights
    in `dtype` (StackedWeights.projections: no gradient), or None twice where `dtype` is fp32.

    Forward: four launches whatever the layer, where stack_directions and the casts after it took 13: one
    concatenation of every parameter (each stacked pair is then a view of it), one cast of x_proj's and dt_proj's
    region (none in fp32), exp and negation of A_log's region into A's memory order. Backward: the gradients of the
    pairs are views of theirs (x_proj's and dt_proj's come in fp32: _XProj and _DtProj sum them so), A_log's is
    dA * A in one product. The values are those of autograd through stack_directions, bit for bit (its
    -(dA) exp(A_log) is dA (-exp(A_log)) exactly)."""

    @staticmethod
    def forward(ctx, dtype, *params):
        ctx.set_materialize_grads(False)  # (the casts' gradients, which nothing takes, would come as zeros: launches)
        flat = torch.cat([t.reshape(-1) for t in params])
        pairs, start = [], 0
        for first, second in zip(params[0::2], params[1::2]):
            pairs.append(flat[start:start + 2 * first.numel()].view(2, *first.shape))
            start += 2 * first.numel()
        conv_w, conv_b, D, dt_bias, x_w, dt_w, A_log = pairs
        x_lo = dt_lo = None
        if dtype != flat.dtype:  # x_proj's and dt_proj's pairs are adjacent in flat: one cast
            n_x, n_dt = x_w.numel(), dt_w.numel()
            end = start - A_log.numel()
            cast = flat[end - n_x - n_dt:end].to(dtype)
            x_lo, dt_lo = cast[:n_x].view(x_w.shape), cast[n_x:].view(dt_w.shape)
            ctx.mark_non_differentiable(x_lo, dt_lo)
        A = torch.empty((2, A_log.shape[2], A_log.shape[1]), device=flat.device, dtype=flat.dtype)
        torch.exp(A_log.transpose(1, 2), out=A).neg_()
        ctx.save_for_backward(A)
        ctx.shapes = [p.shape for p in params[0::2]]
        return conv_w.reshape(2, conv_w.shape[1], -1), conv_b, x_w, dt_w, A.transpose(1, 2), D, dt_bias, x_lo, dt_lo

    @staticmethod
    def backward(ctx, d_conv_w, d_conv_b, d_x_w, d_dt_w, d_A, d_D, d_dt_bias, _d_x_lo, _d_dt_lo):
        A, = ctx.saved_tensors
        grads = (d_conv_w, d_conv_b, d_D, d_dt_bias, d_x_w, d_dt_w, None if d_A is None else d_A * A.transpose(1, 2))
        out = [None]  # (dtype)
        for g, shape in zip(grads, ctx.shapes):
            out += [None, None] if g is None else [g[0].reshape(shape), g[1].reshape(shape)]
        return tuple(out)


def stack_for_training(params: dict, dtype: torch.dtype) -> StackedWeights:
    """StackedWeights for a training call, from the layer's parameters: params maps each of TRAINING_STACK_FIELDS
    to its (forward, backward) pair, all fp32 (conv weights (d, 1, width) or (d, width)); x_proj's and dt_proj's
    weights come in fp32 and, where `dtype` (the activations') is not fp32, in `dtype` too (projections: no cast per
    call after this). What stack_directions of two ScanWeights computes, in a third of the launches (_TrainingStack)."""
    tensors = [t for name in TRAINING_STACK_FIELDS for t in params[name]]
    *stacked, x_lo, dt_lo = _TrainingStack.apply(dtype, *tensors)
    return StackedWeights(*stacked, projections=None if x_lo is None else (x_lo, dt_lo))


def training_stack_applies(params: dict) -> bool:
    """Whether stack_for_training takes these parameters: every one given, fp32, on one device."""
    tensors = [t for name in TRAINING_STACK_FIELDS for t in params.get(name, (None, None))]
    return all(t is not None and t.dtype == torch.float32 and t.device == tensors[0].device for t in tensors)


class MixerGrads:
    """What the backward passes of one training call of the mixer hand each other (eager training):

    - xz's gradient, filled in place by the two passes that make its halves: the scan's backward kernel writes dz
      into the z half and the conv's writes dx into the x half (`half`), so that _SplitXZ's backward hands it on
      without assembling it from two separate tensors (two copies of half of xz per layer). Allocated at the
      first `half` call, in the backward pass.
    - du, the scan's gradient of its input u (the conv's output, which x_proj reads too): the scan's backward
      leaves it here instead of returning it, and x_proj's backward (_XProj) adds its own term into it with one
      batched matmul, instead of autograd adding two full tensors.
    - the rebuild of the scan's inputs (u, delta) with MAMBA_REBUILD_SCAN_INPUTS=1: the forward hands the scan the
      tensors they are recomputed from (set_rebuild), which the scan saves for its backward in their place; that
      backward recomputes them (scan_inputs), x_proj's backward takes u after it (rebuilt_u). Saved rather than
      held here, so autograd releases them with the rest after the backward: a graph kept alive by an output
      keeps this object, not the layer's activations.
    - x_dbl's gradient (the projections' output, split into dt, B and C by _SplitProjections): the scan's backward
      sums dB and dC straight into their columns in x_dbl's dtype and dt_proj's backward writes d dt into its own
      (projection_slot), so that the split's backward has nothing to assemble: before, dB and dC came in fp32 and
      each was cast, then the three were concatenated (three launches a layer)."""

    def __init__(self, shape, channels_last: bool, dtype: torch.dtype, device: torch.device, rebuilds: bool = False):
        self.meta = (shape, channels_last, dtype, device)
        self.grad: Optional[Tensor] = None
        self.du: Optional[Tensor] = None
        self.du_wanted = False  # set by _XProj: its backward takes du from here
        self.rebuilds = rebuilds
        self._rebuild_fn = None
        self._rebuild_from: Optional[tuple] = None  # (until the scan takes them)
        self._rebuilt_u: Optional[Tensor] = None
        self._projections: Optional[tuple] = None  # x_dbl's (shape, strides, storage offset, dtype, device, storage)
        self._projections_grad: Optional[Tensor] = None

    def set_projections(self, x_dbl: Tensor) -> None:
        """x_dbl's layout, which its gradient takes (projection_slot); nothing of x_dbl is kept but its storage's
        address (to tell its views)."""
        self._projections = (x_dbl.shape, x_dbl.stride(), x_dbl.storage_offset(), x_dbl.dtype, x_dbl.device,
                             x_dbl.untyped_storage().data_ptr())

    def projection_slot(self, view: Tensor) -> Optional[Tensor]:
        """The same view of x_dbl's gradient as `view` is of x_dbl (dt, or B / C as the scan takes them), allocating
        the gradient at the first call of a backward pass; None where `view` is not a view of x_dbl, or no x_dbl was
        set."""
        if self._projections is None:
            return None
        _, _, offset, dtype, _, storage = self._projections
        if view.untyped_storage().data_ptr() != storage or view.dtype != dtype:
            return None
        return self._projections_buffer().as_strided(view.shape, view.stride(), view.storage_offset() - offset)

    def take_projections_grad(self) -> Tensor:
        """x_dbl's gradient (allocated here if nothing wrote into it), released from this object."""
        grad, self._projections_grad = self._projections_buffer(), None
        return grad

    def _projections_buffer(self) -> Tensor:
        """x_dbl's gradient, allocated in x_dbl's layout at the first call of a backward pass."""
        if self._projections_grad is None:
            shape, stride, _, dtype, device, _ = self._projections
            self._projections_grad = torch.empty_strided(shape, stride, dtype=dtype, device=device)
        return self._projections_grad

    def set_rebuild(self, function, tensors: tuple) -> None:
        self._rebuild_fn = function
        self._rebuild_from = tuple(None if t is None else t.detach() for t in tensors)

    def take_rebuild_tensors(self) -> Optional[tuple]:
        """The tensors the scan saves instead of u and delta (None: it keeps u and delta)."""
        tensors, self._rebuild_from = self._rebuild_from, None
        return tensors

    def scan_inputs(self, *tensors) -> Tuple[Tensor, Tensor]:
        """(u, delta) recomputed from the scan's saved tensors, for its backward; u stays here for x_proj's,
        which runs next in the same pass (it needs the scan's gradients)."""
        with torch.no_grad():
            u, delta = self._rebuild_fn(*tensors)
        self._rebuilt_u = u
        return u, delta

    def rebuilt_u(self) -> Tensor:
        """u for x_proj's backward: the one the scan's backward rebuilt, released here."""
        u, self._rebuilt_u = self._rebuilt_u, None
        if u is None:
            raise RuntimeError("x_proj's backward ran before the scan's, which rebuilds its input")
        return u

    def full(self) -> Tensor:
        if self.grad is None:
            (batch, channels, seqlen), channels_last, dtype, device = self.meta
            self.grad = torch.empty((batch, seqlen, channels), dtype=dtype, device=device).transpose(1, 2) \
                if channels_last else torch.empty((batch, channels, seqlen), dtype=dtype, device=device)
        return self.grad

    def half(self, index: int) -> Tensor:
        """x's (0) or z's (1) gradient memory: (b, d_inner, L), strided like xz."""
        dim = self.meta[0][1] // 2
        return self.full()[:, index * dim:(index + 1) * dim]


# Eager training: x_proj's and dt_proj's backward passes as _XProj and _DtProj compute them (True), or autograd's
# (False), as the custom ops do: the eager path's bit-for-bit test against them turns it off. _XProj adds its input
# gradient into the scan's du inside the matmul, one rounding where autograd's matmul-then-add rounds twice; both
# take their weight gradients from _weight_grad.
EAGER_PROJ_BACKWARD = True

# The weight gradients of x_proj and dt_proj are (2, out, in) sums over every token row of the batch (25216 at
# Vim-S, batch 128). As one batched matmul, cuBLAS's fp32 kernel for that shape runs a few dozen 32x32 tiles, each
# walking all the rows: 890 us per x_proj gradient on an H200, a fifth of a dense Vim-S fp32 training step
# (train_profile_fp32_h200_2026-11-28.txt). They are summed over WGRAD_BLOCKS blocks of whole samples instead, the
# blocks' products one batched matmul, then added: fp32 x_proj's 903 against 174 us (8 blocks), 133 (16, 32);
# dt_proj's 871 against 128, 93, 74 us; closer to fp64 too (wgrad_blocks_h200_2026-11-28.txt). From 16-bit
# activations into fp32 weights (autocast training) the blocks' products come out in fp32
# (linear_fp32.matmul_fp32_out): x_proj's 28.8 against 47.4 us for the one 16-bit matmul and its cast to fp32,
# dt_proj's 26.5 against 41.4, and no 16-bit rounding (1.6e-6 against 1.7e-3 from the fp64 sums;
# train_small_ops_h200_2026-11-29.txt).
WGRAD_BLOCKS = 16

# MAMBA_REBUILD_SCAN_INPUTS=1: eager training keeps neither of the scan's inputs u (the conv's output) and delta
# (dt_proj's output), each (2, b, d_inner, L) in the activations' dtype; the scan's backward recomputes them (the
# conv's forward and dt_proj's matmul, bit for bit the forward's) from xz's x half and dt, which the layer keeps
# anyway. Vim-S, batch 128, bf16, graphed training on an H200: peak 9.0 against 12.3 GiB for about 3% of the speed
# (the checkpoint interval 32 saves 1.7 GiB for 10%); with MAMBA_SCAN_CKPT_CHUNK=8 as well, 12.4 GiB and about the
# default's speed (docs/speed.md). Off by default (0 or unset).
REBUILD_ENV = "MAMBA_REBUILD_SCAN_INPUTS"


def rebuild_from_env() -> bool:
    """MAMBA_REBUILD_SCAN_INPUTS as a bool (unset: False)."""
    value = os.environ.get(REBUILD_ENV, "")
    if value not in ("", "0", "1"):
        raise RuntimeError(f"{REBUILD_ENV}={value}: must be 1 (recompute the scan's inputs in the backward), "
                           f"0 (keep them) or unset")
    return value == "1"


# True / False overrides the environment (tests); None: MAMBA_REBUILD_SCAN_INPUTS, read at the first training call
# (the entry points check it first: dyvm.cli.check_kernel_settings).
REBUILD_SCAN_INPUTS: Optional[bool] = None
_rebuild_env = functools.cache(rebuild_from_env)


def rebuilds_scan_inputs() -> bool:
    """Whether eager training recomputes the scan's inputs in its backward (see REBUILD_ENV)."""
    return REBUILD_SCAN_INPUTS if REBUILD_SCAN_INPUTS is not None else _rebuild_env()


def _scan_inputs_rebuild(batch: int, seqlen: int):
    """The function recomputing (u, delta) as the training forward made them (the conv's output, channel-contiguous,
    and dt_proj's, transposed to (2, b, d, L)) from what they were made of: see its call."""
    def rebuild(x, conv_weight, conv_bias, mask, dt, dt_weight):
        u = conv_fwd_impl(x, conv_weight, conv_bias, mask, None, True, True)
        delta = _dt_matmul(dt, dt_weight.to(dt.dtype))  # (the cast _dt_proj makes)
        return u, delta.view(2, batch, seqlen, -1).transpose(2, 3)
    return rebuild


def _weight_grad(d_out: Tensor, x: Tensor, batch: int, dtype: torch.dtype) -> Tensor:
    """d_out^T x summed over the rows: d_out (R, K, M), x (R, K, N), K = batch * L rows -> (R, M, N), in the weight's
    `dtype`: fp32 from fp32 or 16-bit inputs as sums over blocks of samples (see WGRAD_BLOCKS), else one matmul in
    the inputs' dtype."""
    widen = dtype == torch.float32 and d_out.dtype in (torch.float16, torch.bfloat16)
    blocks = math.gcd(batch, WGRAD_BLOCKS) if d_out.dtype == torch.float32 or widen else 1
    R, K, M = d_out.shape
    product = linear_fp32.matmul_fp32_out if widen else torch.bmm
    parts = product(d_out.reshape(R * blocks, K // blocks, M).transpose(1, 2),
                    x.reshape(R * blocks, K // blocks, x.shape[-1]))
    if blocks == 1:  # (one product over every row)
        return parts
    if triton_enabled(parts, "causal_conv1d.partial_sums"):  # (one launch, 2 to 3x torch's sum over the blocks)
        from causal_conv1d.partial_sums import sum_middle

        return sum_middle(parts.view(R, blocks, -1))[0].view(R, M, -1)
    return parts.view(R, blocks, M, -1).sum(1)


def _rows(xc: Tensor) -> Tensor:
    """(2, b, d, L) channels-last -> its (2, b*L, d) rows, a view (x_proj's input)."""
    R, batch, dim, seqlen = xc.shape
    return xc.transpose(2, 3).reshape(R, batch * seqlen, dim)


def _x_proj_matmul(xc: Tensor, weight: Tensor, memo: Optional[dict] = None) -> Tensor:
    """xc's rows times x_proj^T per direction, (2, b*L, R + 2N): in fp32 on the kernels' devices as three TF32
    products (mamba_ssm.ops.triton.linear_tf32x3, where linear_fp32.tf32x3_applies: 2x cuBLAS's fp32 batched matmul
    at Vim-S shapes, whose 56 columns leave it bound by memory), else torch.bmm. memo: see linear_fp32.linear."""
    R, batch, dim, seqlen = xc.shape
    x = xc.transpose(2, 3)  # (2, b, L, d)
    if not linear_fp32.tf32x3_applies(x, weight):
        return torch.bmm(_rows(xc), weight.transpose(1, 2))
    return linear_fp32.linear_on_kernel(x, weight.contiguous(), memo=memo).view(R, batch * seqlen, -1)


def _in_dtype(weight: Tensor, cast: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """weight in `dtype`: `cast` where given (StackedWeights.projections), else converted here."""
    return cast if cast is not None else _as_dtype(weight, dtype)


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t.to(dtype), without the call where t has that dtype (Tensor.to returns t itself then, after a dispatch that
    eager inference's host pays: two to four a layer, with the cached weights already in the activations' dtype)."""
    return t if t.dtype == dtype else t.to(dtype)


class _XProj(torch.autograd.Function):
    """x_proj over both directions: xc (2, b, d, L) channels-last, weight (2, R + 2N, d) -> (2, b*L, R + 2N), as
    torch.bmm of xc's rows with the weight in xc's dtype (`cast` where the caller has it); the weight's gradient in
    the weight's dtype (_weight_grad). The backward adds the input gradient into the scan's du when the scan left it
    in `grads` (MixerGrads), with the matmul's own accumulation (one rounding, not two)."""

    @staticmethod
    def forward(ctx, xc: Tensor, weight: Tensor, grads: MixerGrads, cast: Optional[Tensor] = None):
        weight_in = _in_dtype(weight, cast, xc.dtype)
        ctx.rebuilt_input = grads.rebuilds
        ctx.save_for_backward(None if ctx.rebuilt_input else xc, weight_in)
        ctx.grads, grads.du_wanted = grads, True
        ctx.weight_dtype = weight.dtype
        return _x_proj_matmul(xc, weight_in)

    @staticmethod
    def backward(ctx, d_xdbl):
        xc, weight = ctx.saved_tensors
        grads = ctx.grads  # (du: handed off by this backward pass's scan, which always runs before this)
        if ctx.rebuilt_input:
            xc = grads.rebuilt_u()
        du, grads.du = grads.du, None
        d_weight = _weight_grad(d_xdbl, _rows(xc), xc.shape[1], ctx.weight_dtype) if ctx.needs_input_grad[1] \
            else None
        if not ctx.needs_input_grad[0]:
            return None, d_weight, None, None
        if du is not None and du.transpose(2, 3).is_contiguous() and du.dtype == d_xdbl.dtype:
            _rows(du).baddbmm_(d_xdbl, weight)  # du += d_xdbl @ weight, in place (the rows are a view)
            return du, d_weight, None, None
        R, batch, dim, seqlen = xc.shape
        d_xc = torch.bmm(d_xdbl, weight).view(R, batch, seqlen, dim).transpose(2, 3)
        return (d_xc if du is None else du + d_xc), d_weight, None, None


def _dt_matmul(dt: Tensor, weight: Tensor) -> Tensor:
    """dt_proj's product, (2, b*L, R) x (2, d, R)^T: the training forward's and its rebuild's (the same bits)."""
    return torch.bmm(dt, weight.transpose(1, 2))


class _DtProj(torch.autograd.Function):
    """dt_proj over both directions: dt (2, b*L, R) -> delta (2, b*L, d) = dt weight^T, weight (2, d, R) taken in dt's
    dtype (`cast` where the caller has it); the backward takes the weight gradient from _weight_grad."""

    @staticmethod
    def forward(ctx, dt: Tensor, weight: Tensor, batch: int, grads: MixerGrads, cast: Optional[Tensor] = None):
        weight_in = _in_dtype(weight, cast, dt.dtype)
        ctx.save_for_backward(dt, weight_in)
        ctx.batch, ctx.weight_dtype, ctx.grads = batch, weight.dtype, grads
        return _dt_matmul(dt, weight_in)

    @staticmethod
    def backward(ctx, d_delta):
        dt, weight = ctx.saved_tensors
        d_dt = None
        if ctx.needs_input_grad[0]:  # (into its columns of x_dbl's gradient where the split takes that)
            slot = ctx.grads.projection_slot(dt)
            d_dt = torch.bmm(d_delta, weight) if slot is None else torch.bmm(d_delta, weight, out=slot)
        d_weight = _weight_grad(d_delta, dt, ctx.batch, ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return d_dt, d_weight, None, None, None


def _x_proj(xc: Tensor, weight: Tensor, grads: Optional[MixerGrads], memo: Optional[dict],
            cast: Optional[Tensor] = None) -> Tensor:
    """x_proj of both directions' conv outputs, (2, b*L, R + 2N): through _XProj in eager training. cast: the weight
    in xc's dtype, where the caller has it (StackedWeights.projections)."""
    if grads is not None and EAGER_PROJ_BACKWARD:
        return _XProj.apply(xc, weight, grads, cast)
    weight = _as_dtype(weight, xc.dtype)  # (not `cast`, which has no gradient)
    if needs_grad(xc, weight):  # (autograd's own backward: torch.compile, dispatch modes, the bit-for-bit test)
        return torch.bmm(_rows(xc), weight.transpose(1, 2))
    return _x_proj_matmul(xc, weight, memo)


def _dt_proj(dt: Tensor, weight: Tensor, batch: int, grads: Optional[MixerGrads],
            cast: Optional[Tensor] = None) -> Tensor:
    """dt_proj of both directions, (2, b*L, d): through _DtProj in eager training (grads given). cast: see _x_proj."""
    if grads is not None and EAGER_PROJ_BACKWARD:
        return _DtProj.apply(dt, weight, batch, grads, cast)
    return _dt_matmul(dt, _as_dtype(weight, dt.dtype))  # (not `cast`, which has no gradient)


def _xz_meta(xz: Tensor) -> tuple:  # (channels_last: in_proj's output; the gradient goes back that way)
    return xz.shape, xz.transpose(1, 2).is_contiguous(), xz.dtype, xz.device


def _same_memory(a: Tensor, b: Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


class _SplitProjections(torch.autograd.Function):
    """x_dbl (2, b*L, R + 2N) -> (dt, B, C), its column ranges (views), in eager training: the backward returns
    x_dbl's gradient from `grads` (MixerGrads.take_projections_grad), into which the scan's and dt_proj's backward
    passes wrote theirs; a gradient that came from elsewhere is copied into its columns (a missing one: zeros)."""

    @staticmethod
    def forward(ctx, x_dbl: Tensor, grads: MixerGrads, sizes: tuple):
        ctx.set_materialize_grads(False)
        ctx.grads, ctx.sizes = grads, sizes
        grads.set_projections(x_dbl)
        return x_dbl.split_with_sizes(sizes, dim=-1)

    @staticmethod
    def backward(ctx, *column_grads):
        grad = ctx.grads.take_projections_grad()
        for slot, g in zip(grad.split_with_sizes(ctx.sizes, dim=-1), column_grads):
            if g is None:
                slot.zero_()
            elif not _same_memory(g, slot):
                slot.copy_(g)
        return grad, None, None


class _SplitXZ(torch.autograd.Function):
    """xz -> (x, z), its two channel halves (views). The backward returns xz's gradient in xz's memory layout:
    the one in `grads` (MixerGrads) that the scan and the conv wrote their gradients into, or a new tensor (grads
    None: under torch.compile or a dispatch mode, whose custom ops allocate their own). Slicing's backward would
    zero-fill a full tensor per half and add them (a CPU training step of the demo spent 2 ms per layer there)."""

    @staticmethod
    def forward(ctx, xz: Tensor, grads: Optional[MixerGrads]):
        ctx.set_materialize_grads(False)
        ctx.xz_meta = grads.meta if grads is not None else _xz_meta(xz)  # (MixerGrads holds it already)
        ctx.grads = grads
        dim = xz.shape[1] // 2
        return xz[:, :dim], xz[:, dim:]

    @staticmethod
    def backward(ctx, dx, dz):
        watched = ctx.grads is None  # (no data-pointer test there: torch.compile cannot trace one)
        grads = MixerGrads(*ctx.xz_meta) if watched else ctx.grads
        grad = grads.full()
        for index, g in enumerate((dx, dz)):  # a half the op wrote in place needs nothing more
            half = grads.half(index)
            if g is None:
                half.zero_()
            elif watched or not _same_memory(g, half):
                half.copy_(g)
        grads.grad = None
        return grad, None


def _projections_kernel_takes(t: Tensor) -> bool:
    """Whether gated inference on tensors like t takes x_proj and dt_proj from mamba_ssm.ops.triton.gated_proj (the
    pairs that are on only): on the devices the kernels run on, with nothing tracing or watching the ops
    (torch.compile and FLOP counting see the batched matmuls), for 16-bit inputs, and for fp32 where the mixers'
    fp32 Linears take three TF32 products (linear_fp32.tf32x3_wanted: the kernel does the same). Not for plain fp32
    products otherwise (in Triton they run on the CUDA cores at a fifth of cuBLAS's speed, 1202 against 226 us at
    Vim-S shapes on an H200), nor with TF32 matmuls allowed (`--tf32`): one TF32 product in the kernel was faster
    than cuBLAS's at 197 tokens and slower at 68, graphed DyVM-S +3.3% and +0.2% in two rounds
    (gated_proj_tf32_probe_h200_2026-11-28.txt), too little to take."""
    return ((t.dtype in (torch.bfloat16, torch.float16) or linear_fp32.tf32x3_wanted(t)) and not ops_watched()
            and triton_enabled(t, "gated_proj"))


def _projection_parts(xc: Tensor, w: StackedWeights) -> Optional[tuple]:
    """gated_projections' tf32_parts for fp32 inputs (None for 16-bit ones), kept in the cached weights' memo. Called
    only where _projections_kernel_takes held, which lets fp32 through only where tf32x3_wanted: not asked again
    (eager inference is bound by the host, and this runs per layer)."""
    if xc.dtype != torch.float32:
        return None
    return (linear_fp32.weight_parts(w.x_proj_weight.contiguous(), w.memo),  # (the key _x_proj_matmul's split uses)
            linear_fp32.weight_parts(w.dt_proj_weight.contiguous(), w.memo, "dt_proj_tf32"))


def _gated_projections_apply(xc: Tensor) -> bool:
    """_projections_kernel_takes for the conv's output, channel-contiguous as the kernel reads it."""
    return xc.stride(2) == 1 and _projections_kernel_takes(xc)


def _gate_in_projections(x: Tensor) -> bool:
    """Whether gated inference computes DyVM's gates inside the projections kernel (gated_projections' head), for
    the conv's input x: eager calls only. The conv then runs the pairs that are off too (it comes before the
    gates): one launch less a layer for about 8 us more GPU time at Vim-S, a gain where the host sets the pace
    (eager) and a loss inside a CUDA graph, which takes the head's own kernel first."""
    return _projections_kernel_takes(x) and not graph_capturing(x)


def _halves(xz: Tensor) -> Tuple[Tensor, Tensor]:
    """xz's channel halves x and z, (b, d, L) views: xz[:, :d] and xz[:, d:] as one as_strided each (indexing
    parses its slices in Python: twice the host time of a view, at every layer of eager inference)."""
    batch, two_d, seqlen = xz.shape
    dim, strides, offset = two_d // 2, xz.stride(), xz.storage_offset()
    return (xz.as_strided((batch, dim, seqlen), strides, offset),
            xz.as_strided((batch, dim, seqlen), strides, offset + dim * strides[1]))


def _scan_views_of_columns(delta: Tensor, B: Tensor, C: Tensor, batch: int,
                           seqlen: int) -> Tuple[Tensor, Tensor, Tensor]:
    """delta (2, b*L, d), B and C (2, b*L, N) (x_dbl's columns) -> as the scan reads them, (2, b, d, L) and
    (2, b, 1, N, L) views: the path autograd follows (training)."""
    delta = delta.view(2, batch, seqlen, delta.shape[-1]).transpose(2, 3)
    B = B.view(2, batch, seqlen, 1, B.shape[-1]).permute(0, 1, 3, 4, 2)
    C = C.view(2, batch, seqlen, 1, C.shape[-1]).permute(0, 1, 3, 4, 2)
    return delta, B, C


def _scan_views(x_dbl: Tensor, delta: Tensor, batch: int, seqlen: int, dt_rank: int,
                d_state: int) -> Tuple[Tensor, Tensor, Tensor]:
    """_scan_views_of_columns of delta and x_dbl's B and C columns (x_dbl (2, b*L, R + 2N)), without a gradient: one
    as_strided each where both are contiguous (eager inference: the slices, views and permutes are 8 dispatches a
    layer, which the host pays at every layer), the same shapes and strides."""
    if not (x_dbl.is_contiguous() and delta.is_contiguous()):
        return _scan_views_of_columns(delta, x_dbl[..., dt_rank:dt_rank + d_state], x_dbl[..., dt_rank + d_state:],
                                      batch, seqlen)
    rows, n_out, dim = batch * seqlen, x_dbl.shape[2], delta.shape[2]
    delta = delta.as_strided((2, batch, dim, seqlen), (rows * dim, seqlen * dim, 1, dim), delta.storage_offset())
    shape, strides = (2, batch, 1, d_state, seqlen), (rows * n_out, seqlen * n_out, d_state, 1, n_out)
    start = x_dbl.storage_offset() + dt_rank
    return delta, x_dbl.as_strided(shape, strides, start), x_dbl.as_strided(shape, strides, start + d_state)


def bimamba_v2_inner_stacked(xz: Tensor, fwd, bwd, gate: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                             divide_out: bool = True, stacked: Optional[StackedWeights] = None,
                             lengths: Optional[Tensor] = None, gate_head: Optional[tuple] = None) -> Tensor:
    """See mamba_ssm.ops.bimamba_interface (arguments checked there). Returns (b, d_inner, L). stacked:
    stack_directions(fwd, bwd), computed here when not given. gate_head (column, weight, bias), inference on the
    kernels only: the gates are not computed yet; they are DyVM's gate head on xz's class column, written into
    `gate` (by the projections kernel where _gate_in_projections, else by the head's kernel first)."""
    batch, two_d, seqlen = xz.shape
    dim = two_d // 2
    xz_needs_grad, watched = needs_grad(xz), ops_watched()
    grads = MixerGrads(*_xz_meta(xz), rebuilds=rebuilds_scan_inputs()) if xz_needs_grad and not watched else None
    # (views by strides in eager calls only: a tracer cannot follow a storage offset)
    x, z = _SplitXZ.apply(xz, grads) if xz_needs_grad else (xz[:, :dim], xz[:, dim:]) if watched else _halves(xz)
    dt_rank, d_state = fwd.dt_proj_weight.shape[1], fwd.A.shape[1]
    w = stack_directions(fwd, bwd) if stacked is None else stacked
    if mask is not None:
        mask = mask.to(x.dtype)
    training = needs_grad(xz, gate, *w.tensors())
    gate_skip = gate if gate is not None and not training else None
    head_in_projections = gate_head is not None and gate_skip is not None and _gate_in_projections(x)
    if gate_head is not None and not head_in_projections:
        from mamba_ssm.ops.triton.gated_proj import gate_head_decide

        gate_head_decide(xz, *gate_head, gate)
    # (2, b, d, L), channels-last. A training mask carries the straight-through gradient of the pruning
    # decisions: the conv op returns it (computed in its backward pass, nothing extra saved).
    # (the conv on the kernels writes xc channel-contiguous, the layout the projections kernel reads: its plan
    # checks it)
    xc = conv_apply(x, w.conv_weight, w.conv_bias, mask, None if head_in_projections else gate_skip, True, True,
                    grads, lengths)
    if gate_skip is not None and (head_in_projections or _gated_projections_apply(xc)):
        from mamba_ssm.ops.triton.gated_proj import gated_projections

        x_dbl, delta = gated_projections(xc, _as_dtype(w.x_proj_weight, xc.dtype),
                                         _as_dtype(w.dt_proj_weight, xc.dtype), gate_skip,
                                         head=(xz, *gate_head) if head_in_projections else None,
                                         tf32_parts=_projection_parts(xc, w))
        delta, B, C = _scan_views(x_dbl, delta, batch, seqlen, dt_rank, d_state)  # (no tracer on this path)
    else:
        x_cast, dt_cast = w.projections or (None, None)
        x_dbl = _x_proj(xc, w.x_proj_weight, grads, w.memo, x_cast)
        sizes = (dt_rank, d_state, d_state)
        dt, B, C = _SplitProjections.apply(x_dbl, grads, sizes) if grads is not None and EAGER_PROJ_BACKWARD \
            else x_dbl.split_with_sizes(sizes, dim=-1)  # (not .split: a Python wrapper)
        delta = _dt_proj(dt, w.dt_proj_weight, batch, grads, dt_cast)
        if grads is not None and grads.rebuilds:
            grads.set_rebuild(_scan_inputs_rebuild(batch, seqlen), (x, w.conv_weight, w.conv_bias, mask, dt,
                                                                   w.dt_proj_weight if dt_cast is None else dt_cast))
        if training or watched:
            delta, B, C = _scan_views_of_columns(delta, B, C, batch, seqlen)
        else:
            delta, B, C = _scan_views(x_dbl, delta, batch, seqlen, dt_rank, d_state)
    return scan_output(xc, delta, w.A, B, C, w.D, z, w.dt_proj_bias, gate, True, 0.5 if divide_out else 1.0, True,
                       training, grads, lengths, w.memo)
