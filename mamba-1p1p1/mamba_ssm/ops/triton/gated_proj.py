"""x_proj and dt_proj of DyVM's gated inference scan, for the (sample, direction) pairs whose gate is on.

bimamba_stacked runs the two projections as batched matmuls over the direction axis: x_dbl = xc @ x_proj^T
(dt_rank + 2 d_state columns: dt, B, C), then delta = dt @ dt_proj^T. With gates, a pair that is off is skipped
by the conv and the scan, but cuBLAS computed its projections all the same: about a quarter of that work at
the authors' keep ratio, and the FLOP count (dyvm.flops) counts them as skipped. Here one program takes a tile
of one pair's tokens through both projections and returns at once where the pair's gate is 0: the tile's x_dbl
(as the first matmul writes it, in the input dtype) and its delta (computed from the rounded dt, as the second
matmul reads it). Pairs that are off leave their rows unwritten; the scan does not read them.

Same arithmetic as the matmuls, fp32 accumulation of products of the input dtype, in another order of the
sums; fp32 inputs use TF32 tensor cores only where torch's matmuls would (allow_tf32).
"""
import torch
import triton
import triton.language as tl

from causal_conv1d.triton_utils import interpreted, launch, next_pow2, remember


@triton.jit
def _gated_proj_kernel(x_ptr, wx_ptr, wdt_ptr, gate_ptr, xdbl_ptr, delta_ptr,
                       seqlen, dim, dt_rank, d_state,
                       sx_r, sx_b, sx_t, swx_r, swx_o, swdt_r, swdt_o, sg_b, sg_r,
                       so_r, so_t, sd_r, sd_t,
                       PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    r = tl.program_id(2)
    if tl.load(gate_ptr + pid_b * sg_b + r * sg_r) == 0:
        return
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = rows < seqlen
    cols_r = tl.arange(0, BLOCK_R)
    cols_n = tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_base = x_ptr + r * sx_r + pid_b * sx_b + rows[:, None] * sx_t
    wx_base = wx_ptr + r * swx_r
    acc_dt = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    acc_B = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    acc_C = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        k = k0 + ks
        mk = k < dim
        x = tl.load(x_base + k[None, :], mask=mask_t[:, None] & mk[None, :], other=0.0)
        # x_proj's rows: dt (dt_rank), then B and C (d_state each), read transposed (K, outputs)
        w_dt = tl.load(wx_base + cols_r[None, :] * swx_o + k[:, None],
                       mask=mk[:, None] & (cols_r < dt_rank)[None, :], other=0.0)
        w_B = tl.load(wx_base + (dt_rank + cols_n)[None, :] * swx_o + k[:, None],
                      mask=mk[:, None] & (cols_n < d_state)[None, :], other=0.0)
        w_C = tl.load(wx_base + (dt_rank + d_state + cols_n)[None, :] * swx_o + k[:, None],
                      mask=mk[:, None] & (cols_n < d_state)[None, :], other=0.0)
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
    cols_d = tl.arange(0, BLOCK_D)
    d_base = delta_ptr + r * sd_r + (pid_b * seqlen + rows)[:, None] * sd_t
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + cols_d
        md = d < dim
        w = tl.load(wdt_ptr + r * swdt_r + d[None, :] * swdt_o + cols_r[:, None],
                    mask=(cols_r < dt_rank)[:, None] & md[None, :], other=0.0)
        if UPCAST:
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


_plans = {}  # (grid, integer arguments, constexprs, output shapes) per key: eager inference is bound by the host


def gated_projections(xc: torch.Tensor, x_proj_weight: torch.Tensor, dt_proj_weight: torch.Tensor,
                      gate: torch.Tensor, block_t: int = 0, block_d: int = 0, num_warps: int = 0):
    """xc (2, b, d, L) channel-contiguous (the stacked conv's output), x_proj_weight (2, R + 2N, d), dt_proj_weight
    (2, d, R), gate (b, 2) -> x_dbl (2, b*L, R + 2N) and delta (2, b*L, d) in xc's dtype, as
    torch.bmm(xc rows, x_proj^T) and torch.bmm(x_dbl[..., :R], dt_proj^T) compute them, for the pairs whose gate
    is not 0 (the rows of the others are left unwritten). block_t, block_d, num_warps override TUNING."""
    x_proj_weight, dt_proj_weight = x_proj_weight.contiguous(), dt_proj_weight.contiguous()
    key = (xc.shape, xc.stride(), xc.dtype, x_proj_weight.shape, x_proj_weight.stride(), x_proj_weight.dtype,
           dt_proj_weight.shape, dt_proj_weight.stride(), dt_proj_weight.dtype, gate.shape, gate.stride(),
           torch.backends.cuda.matmul.allow_tf32, block_t, block_d, num_warps)
    plan = _plans.get(key)
    if plan is None:
        plan = remember(_plans, key, _plan(xc, x_proj_weight, dt_proj_weight, gate, block_t, block_d, num_warps))
    grid, ints, kwargs, (dbl_shape, delta_shape) = plan
    x_dbl = torch.empty(dbl_shape, device=xc.device, dtype=xc.dtype)
    delta = torch.empty(delta_shape, device=xc.device, dtype=xc.dtype)
    launch(_gated_proj_kernel, grid, xc, x_proj_weight, dt_proj_weight, gate, x_dbl, delta, *ints, **kwargs)
    return x_dbl, delta


def _plan(xc, x_proj_weight, dt_proj_weight, gate, block_t, block_d, num_warps):
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
    upcast = interpreted(_gated_proj_kernel) and xc.dtype != torch.float32
    if xc.dtype == torch.float32:  # TF32 tensor cores only where torch's matmuls would use them
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    else:  # (no effect on 16-bit inputs on a GPU; the interpreter's upcast products are exact in fp32)
        precision = "ieee" if upcast else "tf32"
    block_t = block_t or TUNING["block_t"]
    # x_dbl, delta: (2, b*L, n) contiguous, so their strides follow from the shapes
    ints = (seqlen, dim, dt_rank, d_state, xc.stride(0), xc.stride(1), xc.stride(3), x_proj_weight.stride(0),
            x_proj_weight.stride(1), dt_proj_weight.stride(0), dt_proj_weight.stride(1), gate.stride(0),
            gate.stride(1), batch * seqlen * n_out, n_out, batch * seqlen * dim, dim)
    kwargs = dict(PRECISION=precision, UPCAST=upcast, BLOCK_T=block_t, BLOCK_K=64,
                  BLOCK_R=max(16, next_pow2(dt_rank)), BLOCK_N=max(16, next_pow2(d_state)),
                  BLOCK_D=block_d or TUNING["block_d"], num_warps=num_warps or TUNING["num_warps"])
    return (-(-seqlen // block_t), batch, 2), ints, kwargs, ((2, batch * seqlen, n_out), (2, batch * seqlen, dim))
