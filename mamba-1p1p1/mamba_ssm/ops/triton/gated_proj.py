"""DyVM's gated inference kernels: the gate head, and x_proj / dt_proj of the (sample, direction) pairs whose gate
is on.

The gate head. At inference one kernel: the class token's column of xz -> Linear(2 d_inner, 2) -> > 0.

In eager inference the head was three launches per layer (the column read, the Linear, the comparison), each
with its host work, on a path bound by the host. The kernel computes what those ops compute: the column and
the weights in the logits' dtype (autocast's, as autocast casts the Linear's inputs; the weights are cast on
the host, which is free for the cached inference weights), products summed in fp32 with the bias, then the
sign (sigmoid(l) > 0.5 exactly when l > 0; rounding the logit to a narrower dtype first keeps its sign). Only
the order of the fp32 sum differs from cuBLAS's, so a decision can differ only for a logit within fp32
rounding of zero. Writes the 0/1 gates (batch, 2) in the logits' dtype.

The projections. bimamba_stacked runs the two projections as batched matmuls over the direction axis:
x_dbl = xc @ x_proj^T (dt_rank + 2 d_state columns: dt, B, C), then delta = dt @ dt_proj^T. With gates, a pair
that is off is skipped by the scan, but cuBLAS computed its projections all the same: about a quarter of that work at
the authors' keep ratio, and the FLOP count (dyvm.flops) counts them as skipped. Here one program takes a tile
of one pair's tokens through both projections and returns at once where the pair's gate is 0: the tile's x_dbl
(as the first matmul writes it, in the input dtype) and its delta (computed from the rounded dt, as the second
matmul reads it). Pairs that are off leave their rows unwritten; the scan does not read them.

Same arithmetic as the matmuls, fp32 accumulation of products of the input dtype, in another order of the
sums; fp32 inputs use TF32 tensor cores only where torch's matmuls would (allow_tf32). With TF32 off, fp32 inputs
given the weights' TF32 parts (`tf32_parts`, as the fp32 Linear kernel takes its weights: linear_tf32x3) take
three TF32 products per product instead (dot_tf32x3), as close to fp64 as cuBLAS's fp32 and at Vim-S shapes faster
than x_proj on the Linear kernel plus dt_proj on cuBLAS, once a quarter of the pairs is off (FP32_TUNING).

In eager inference the projections kernel can compute the gates itself (its `head` argument: every program of a
pair computes the pair's two logits with gate_logits, the same code as the head's kernel, and the first writes
the gate), which saves the head's launch (mamba_ssm.ops.bimamba_stacked._gate_in_projections).
"""
import torch
import triton
import triton.language as tl

from causal_conv1d.kernel_utils import tf32_matmuls_allowed
from causal_conv1d.triton_utils import dot_tf32x3, interpreted, launch, next_pow2, remember, tf32_round


@triton.jit
def gate_logits(xz_ptr, w_ptr, b_ptr, pid_b, width, column, sxz_b, sxz_c, sxz_t, sw_r, BLOCK: tl.constexpr):
    """Sample pid_b's two logits (fp32): xz's column `column` times the head's two rows, summed in fp32 with the
    bias. Shared with the projections kernel, which computes the gates itself in eager inference: the same
    code, so the same decisions."""
    rows = tl.arange(0, 2)  # the two directions' logits
    acc = tl.zeros((2, BLOCK), dtype=tl.float32)
    for start in range(0, width, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < width
        x = tl.load(xz_ptr + pid_b * sxz_b + offs * sxz_c + column * sxz_t, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * sw_r + offs[None, :], mask=ok[None, :], other=0.0).to(tl.float32)
        acc += x[None, :] * w
    return tl.sum(acc, axis=1) + tl.load(b_ptr + rows).to(tl.float32)


@triton.jit
def _gate_head_kernel(xz_ptr, w_ptr, b_ptr, out_ptr, width, column, sxz_b, sxz_c, sxz_t, sw_r, so_b, so_r,
                      BLOCK: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    logits = gate_logits(xz_ptr, w_ptr, b_ptr, pid_b, width, column, sxz_b, sxz_c, sxz_t, sw_r, BLOCK)
    gates = tl.where(logits > 0, 1.0, 0.0)
    tl.store(out_ptr + pid_b * so_b + tl.arange(0, 2) * so_r, gates.to(out_ptr.dtype.element_ty))


def head_block(width: int) -> int:
    """The logits' block of columns (gate_logits' BLOCK) for a head of this width: the same in both kernels."""
    return min(next_pow2(width), 2048)


def check_head(xz: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor):
    """The head's weights in out's dtype, contiguous (no-ops for the cached inference weights, which are in the
    autocast dtype already), after checking that xz (b, 2 d_inner, L), weight, bias and out (b, 2) fit."""
    batch, width, _ = xz.shape
    if weight.shape != (2, width) or bias.shape != (2,) or out.shape != (batch, 2) or xz.dtype != out.dtype:
        raise ValueError(f"gate head: weight {tuple(weight.shape)}, bias {tuple(bias.shape)} and out "
                         f"{tuple(out.shape)} {out.dtype} do not fit xz {tuple(xz.shape)} {xz.dtype}")
    if weight.dtype != out.dtype or bias.dtype != out.dtype:  # (Tensor.to dispatches even where it changes nothing)
        weight, bias = weight.to(out.dtype), bias.to(out.dtype)
    return weight.contiguous(), bias.contiguous()


def gate_head_decide(xz: torch.Tensor, column: int, weight: torch.Tensor, bias: torch.Tensor,
                     out: torch.Tensor) -> torch.Tensor:
    """xz (b, 2 d_inner, L) in out's dtype, weight (2, 2 d_inner), bias (2,) -> out (b, 2) written with
    (xz[:, :, column] @ weight.T + bias > 0), the weights taken in out's dtype (see the module docstring)."""
    weight, bias = check_head(xz, weight, bias, out)
    batch, width, _ = xz.shape
    launch(_gate_head_kernel, (batch,), xz, weight, bias, out, width, column, *xz.stride(), weight.stride(0),
           *out.stride(), BLOCK=head_block(width), num_warps=4)
    return out


@triton.jit
def _x_proj_columns(w_base, k, mk, cols_r, cols_n, swx_o, dt_rank, d_state):
    """x_proj's rows for the reduction steps k, read transposed (K, outputs): dt (dt_rank), then B and C (d_state
    each), padded with zeros to their blocks."""
    w_dt = tl.load(w_base + cols_r[None, :] * swx_o + k[:, None], mask=mk[:, None] & (cols_r < dt_rank)[None, :],
                   other=0.0)
    mask_n = mk[:, None] & (cols_n < d_state)[None, :]
    w_B = tl.load(w_base + (dt_rank + cols_n)[None, :] * swx_o + k[:, None], mask=mask_n, other=0.0)
    w_C = tl.load(w_base + (dt_rank + d_state + cols_n)[None, :] * swx_o + k[:, None], mask=mask_n, other=0.0)
    return w_dt, w_B, w_C


@triton.jit
def _gated_proj_kernel(x_ptr, wx_ptr, wx_lo_ptr, wdt_ptr, wdt_lo_ptr, gate_ptr, xdbl_ptr, delta_ptr,
                       xz_ptr, hw_ptr, hb_ptr, width, column, sxz_b, sxz_c, sxz_t, shw_r,
                       seqlen, dim, dt_rank, d_state,
                       sx_r, sx_b, sx_t, swx_r, swx_o, swdt_r, swdt_o, sg_b, sg_r,
                       so_r, so_t, sd_r, sd_t,
                       PRECISION: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       GATE_HEAD: tl.constexpr, HEAD_BLOCK: tl.constexpr):
    # SPLIT: fp32 as three TF32 products (dot_tf32x3), the weights given as their TF32 parts (wx / wx_lo, wdt /
    # wdt_lo), x and dt split here; else one tl.dot of PRECISION (wx_lo, wdt_lo unread).
    pid_t = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    r = tl.program_id(2)
    if GATE_HEAD:  # this pair's gate from the head (every program of the pair; the first tile writes it)
        logits = gate_logits(xz_ptr, hw_ptr, hb_ptr, pid_b, width, column, sxz_b, sxz_c, sxz_t, shw_r, HEAD_BLOCK)
        gate = tl.sum(tl.where((tl.arange(0, 2) == r) & (logits > 0), 1.0, 0.0), axis=0)
        if pid_t == 0:
            tl.store(gate_ptr + pid_b * sg_b + r * sg_r, gate.to(gate_ptr.dtype.element_ty))
    else:
        gate = tl.load(gate_ptr + pid_b * sg_b + r * sg_r).to(tl.float32)
    if gate == 0:
        return
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = rows < seqlen
    cols_r = tl.arange(0, BLOCK_R)
    cols_n = tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_base = x_ptr + r * sx_r + pid_b * sx_b + rows[:, None] * sx_t
    acc_dt = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    acc_B = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    acc_C = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        k = k0 + ks
        mk = k < dim
        x = tl.load(x_base + k[None, :], mask=mask_t[:, None] & mk[None, :], other=0.0)
        w_dt, w_B, w_C = _x_proj_columns(wx_ptr + r * swx_r, k, mk, cols_r, cols_n, swx_o, dt_rank, d_state)
        if SPLIT:
            l_dt, l_B, l_C = _x_proj_columns(wx_lo_ptr + r * swx_r, k, mk, cols_r, cols_n, swx_o, dt_rank, d_state)
            x_hi = tf32_round(x)
            x_lo = tf32_round(x - x_hi)
            acc_dt = dot_tf32x3(x_hi, x_lo, w_dt, l_dt, acc_dt)
            acc_B = dot_tf32x3(x_hi, x_lo, w_B, l_B, acc_B)
            acc_C = dot_tf32x3(x_hi, x_lo, w_C, l_C, acc_C)
        else:
            if UPCAST:  # (the interpreter's dot cannot multiply bf16: fp32 products of the same values)
                x, w_dt, w_B, w_C = x.to(tl.float32), w_dt.to(tl.float32), w_B.to(tl.float32), w_C.to(tl.float32)
            acc_dt = tl.dot(x, w_dt, acc_dt, input_precision=PRECISION)
            acc_B = tl.dot(x, w_B, acc_B, input_precision=PRECISION)
            acc_C = tl.dot(x, w_C, acc_C, input_precision=PRECISION)
    out_dtype = xdbl_ptr.dtype.element_ty
    o_base = xdbl_ptr + r * so_r + (pid_b * seqlen + rows)[:, None] * so_t
    dt = acc_dt.to(out_dtype)
    tl.store(o_base + cols_r[None, :], dt, mask=mask_t[:, None] & (cols_r < dt_rank)[None, :])
    mask_n = mask_t[:, None] & (cols_n < d_state)[None, :]
    tl.store(o_base + (dt_rank + cols_n)[None, :], acc_B.to(out_dtype), mask=mask_n)
    tl.store(o_base + (dt_rank + d_state + cols_n)[None, :], acc_C.to(out_dtype), mask=mask_n)
    # delta = dt @ dt_proj^T, a BLOCK_D-channel slab at a time (dt's padding columns are zeros)
    if SPLIT:
        dt_hi = tf32_round(dt)
        dt_lo = tf32_round(dt - dt_hi)
    cols_d = tl.arange(0, BLOCK_D)
    d_base = delta_ptr + r * sd_r + (pid_b * seqlen + rows)[:, None] * sd_t
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + cols_d
        md = d < dim
        w_off = r * swdt_r + d[None, :] * swdt_o + cols_r[:, None]
        mask_w = (cols_r < dt_rank)[:, None] & md[None, :]
        w = tl.load(wdt_ptr + w_off, mask=mask_w, other=0.0)
        if SPLIT:
            delta = dot_tf32x3(dt_hi, dt_lo, w, tl.load(wdt_lo_ptr + w_off, mask=mask_w, other=0.0),
                               tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32))
        elif UPCAST:
            delta = tl.dot(dt.to(tl.float32), w.to(tl.float32), input_precision=PRECISION)
        else:
            delta = tl.dot(dt, w, input_precision=PRECISION)
        tl.store(d_base + d[None, :], delta.to(delta_ptr.dtype.element_ty), mask=mask_t[:, None] & md[None, :])


# Launch parameters (tokens per program, channels per delta slab, warps), from the sweep of
# benchmarks/gpu_check.py --sections proj (H200, bf16, batch 128, d_inner 768, gates 0.75 on; us, L 197 / 68):
# (64, 128, 4) 51 / 24 against the matmuls' 64 / 27; (64, 64, 4) 60 / 30; (128, 64, 4) 47 / 28; (32, 64, 4)
# 80 / 46; more warps or larger tiles were slower (gpu_check_proj7_h200_2026-11-27h.log). With every pair on the
# matmuls are faster (64 / 27 against 71 / 41).
TUNING = {"block_t": 64, "block_d": 128, "num_warps": 4}
# fp32, the same sweep (three TF32 products with tf32_parts; results/gated_proj_fp32_tf32x3_h200_2026-11-28.txt;
# us with about 3/4 of the pairs on at L 197 / 138 / 97 / 68, against x_proj on the tf32x3 Linear kernel and dt_proj on
# cuBLAS over every pair: 169 / 134 / 89 / 78): (64, 64, 4) 129 / 119 / 65 / 64; (128, 64, 8) 143 / 141 / 93 / 88;
# (64, 32, 4) 148 / 139 / 76 / 75; (64, 128, 4) 193 at L 197; wider slabs or 2 warps were slower still. With every
# pair on the matmuls are faster (169 / 134 against 179 / 126 at L 197 / 138): dense models keep them. One TF32
# product (TF32 matmuls allowed; not taken by the mixer, see bimamba_stacked) was fastest with the same tiles at L 197
# (gated_proj_tf32_probe_h200_2026-11-28.txt).
FP32_TUNING = {"block_t": 64, "block_d": 64, "num_warps": 4}


_plans = {}  # (grid, integer arguments, constexprs, output shapes) per key: eager inference is bound by the host


def gated_projections(xc: torch.Tensor, x_proj_weight: torch.Tensor, dt_proj_weight: torch.Tensor,
                      gate: torch.Tensor, block_t: int = 0, block_d: int = 0, num_warps: int = 0, head=None,
                      tf32_parts=None):
    """xc (2, b, d, L) channel-contiguous (the stacked conv's output), x_proj_weight (2, R + 2N, d), dt_proj_weight
    (2, d, R), gate (b, 2) -> x_dbl (2, b*L, R + 2N) and delta (2, b*L, d) in xc's dtype, as
    torch.bmm(xc rows, x_proj^T) and torch.bmm(x_dbl[..., :R], dt_proj^T) compute them, for the pairs whose gate
    is not 0 (the rows of the others are left unwritten). block_t, block_d, num_warps override TUNING.
    head (xz, column, weight, bias): the gates are not known yet; the kernel computes them from DyVM's gate head
    as gate_head_decide does (the same code) and writes them into `gate`.
    tf32_parts ((x_proj hi, lo), (dt_proj hi, lo)), fp32 only: the weights' TF32 parts as linear_tf32x3.split_tf32
    writes them; both products are then three TF32 tensor-core products (closer to fp64 than cuBLAS's fp32, as
    linear_tf32x3's), and the parts are read instead of the weights."""
    x_proj_weight, dt_proj_weight = x_proj_weight.contiguous(), dt_proj_weight.contiguous()
    key = (xc.shape, xc.stride(), xc.dtype, x_proj_weight.shape, x_proj_weight.stride(), x_proj_weight.dtype,
           dt_proj_weight.shape, dt_proj_weight.stride(), dt_proj_weight.dtype, gate.shape, gate.stride(),
           tf32_matmuls_allowed(), block_t, block_d, num_warps, tf32_parts is not None)
    plan = _plans.get(key)
    if plan is None:
        plan = remember(_plans, key, _plan(xc, x_proj_weight, dt_proj_weight, gate, block_t, block_d, num_warps,
                                           tf32_parts))
    grid, ints, kwargs, (dbl_shape, delta_shape) = plan
    x_dbl, delta = xc.new_empty(dbl_shape), xc.new_empty(delta_shape)  # (new_empty: a quicker call than torch.empty)
    if head is None:
        head_args, head_kwargs = (xc, xc, xc, 0, 0, 0, 0, 0, 0), dict(GATE_HEAD=False, HEAD_BLOCK=16)
    else:
        xz, column, weight, bias = head
        weight, bias = check_head(xz, weight, bias, gate)
        head_args = (xz, weight, bias, xz.shape[1], column, *xz.stride(), weight.stride(0))
        head_kwargs = dict(GATE_HEAD=True, HEAD_BLOCK=head_block(xz.shape[1]))
    (wx, wx_lo), (wdt, wdt_lo) = tf32_parts or ((x_proj_weight, x_proj_weight), (dt_proj_weight, dt_proj_weight))
    launch(_gated_proj_kernel, grid, xc, wx, wx_lo, wdt, wdt_lo, gate, x_dbl, delta, *head_args, *ints, **kwargs,
           **head_kwargs)
    return x_dbl, delta


def _plan(xc, x_proj_weight, dt_proj_weight, gate, block_t, block_d, num_warps, tf32_parts):
    """The launch of gated_projections for these inputs' shapes, strides and dtypes, checked once."""
    R2, batch, dim, seqlen = xc.shape
    n_out, dt_rank = x_proj_weight.shape[1], dt_proj_weight.shape[2]
    d_state = (n_out - dt_rank) // 2
    if (R2 != 2 or xc.stride(2) != 1 or x_proj_weight.shape != (2, n_out, dim) or n_out != dt_rank + 2 * d_state
            or dt_proj_weight.shape != (2, dim, dt_rank) or gate.shape != (batch, 2)
            or x_proj_weight.dtype != xc.dtype or dt_proj_weight.dtype != xc.dtype):
        raise ValueError(f"gated projections: xc {tuple(xc.shape)} {xc.dtype} (channel-contiguous), x_proj "
                         f"{tuple(x_proj_weight.shape)} {x_proj_weight.dtype}, dt_proj {tuple(dt_proj_weight.shape)} "
                         f"{dt_proj_weight.dtype} and gate {tuple(gate.shape)} do not fit")
    split = tf32_parts is not None
    if split and (xc.dtype != torch.float32 or any(
            p.shape != w.shape or p.dtype != torch.float32 or not p.is_contiguous()
            for part, w in zip(tf32_parts, (x_proj_weight, dt_proj_weight)) for p in part)):
        raise ValueError("gated projections: TF32 parts are for fp32 inputs, two contiguous fp32 tensors of each "
                         "weight's shape (split_tf32's)")
    upcast = interpreted(_gated_proj_kernel) and xc.dtype != torch.float32
    if xc.dtype == torch.float32:  # TF32 tensor cores only where torch's matmuls would use them
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    else:  # (no effect on 16-bit inputs on a GPU; the interpreter's upcast products are exact in fp32)
        precision = "ieee" if upcast else "tf32"
    tuning = FP32_TUNING if xc.dtype == torch.float32 else TUNING
    block_t = block_t or tuning["block_t"]
    # x_dbl, delta: (2, b*L, n) contiguous, so their strides follow from the shapes
    ints = (seqlen, dim, dt_rank, d_state, xc.stride(0), xc.stride(1), xc.stride(3), x_proj_weight.stride(0),
            x_proj_weight.stride(1), dt_proj_weight.stride(0), dt_proj_weight.stride(1), gate.stride(0),
            gate.stride(1), batch * seqlen * n_out, n_out, batch * seqlen * dim, dim)
    # (SPLIT: 32-deep steps, each into a fresh accumulator, as linear_tf32x3's)
    kwargs = dict(PRECISION=precision, SPLIT=split, UPCAST=upcast, BLOCK_T=block_t, BLOCK_K=32 if split else 64,
                  BLOCK_R=max(16, next_pow2(dt_rank)), BLOCK_N=max(16, next_pow2(d_state)),
                  BLOCK_D=block_d or tuning["block_d"], num_warps=num_warps or tuning["num_warps"])
    return (-(-seqlen // block_t), batch, 2), ints, kwargs, ((2, batch * seqlen, n_out), (2, batch * seqlen, dim))
