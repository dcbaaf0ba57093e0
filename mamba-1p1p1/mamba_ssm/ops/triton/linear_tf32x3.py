"""fp32 Linear layers on TF32 tensor cores as three products: out = x @ w^T (+ bias), fp32 in and out.

cuBLAS multiplies fp32 on the CUDA cores (torch's default, allow_tf32 off): at Vim-S training shapes (25216 token
rows) in_proj's forward took 610 us on an H200. TF32 tensor cores are several times faster but keep 10 mantissa
bits. Split each fp32 operand into a TF32 part and a TF32 remainder, a = a_hi + a_lo, both rounded to nearest, and
sum three tensor-core products, a_lo b_hi + a_hi b_lo + a_hi b_hi: the dropped a_lo b_lo is about 2^-22 of each
product, and the fp32 accumulation runs in blocks of the reduction, so the result is closer to the fp64 product
than cuBLAS's fp32 one (1.5e-7 against 3.5e-7 to 7e-7 relative at Vim-S shapes).

The weight comes split already (`split_tf32`: two (N, K) tensors whose values are exact TF32), and x is split in
registers. Triton's own input_precision "tf32x3" splits both operands inside the kernel; a split weight is loaded
as it is, so the tensor cores read it from shared memory (Hopper's wgmma) and the three products run as plain TF32
dots, each 32-deep step into a fresh accumulator (see the kernel): 354 against 435 us for in_proj's forward, 182
against 216 for out_proj's, 348 against 418 for in_proj's input gradient at 25216 rows on an H200, the weight's
split included (benchmarks/results/linear_tf32_split_h200_2026-11-28.txt). Splitting a weight is one small launch
(in_proj's: 0.6M elements); eager inference keeps the parts with the layer's other cached weights.

x is (batch, L, K) with any strides (out_proj reads a transposed view); the weight's parts are (N, K)
contiguous, as split_tf32 writes them from the weight (forward) or its transposed view (input gradient). The output
is (batch, L, N) contiguous. A leaf: the op layer is mamba_ssm.ops.linear_fp32.

Live rows (DyVM training after a pruning stage, where each image's pruned tokens sit behind its kept ones and
nothing reads them): with `rows` (batch * L,) int32, a permutation of the token rows b * L + t that lists the
live rows first, and `live` (1,) int32 their count, both on the device, the row tiles walk that order: tiles
of live rows compute as before (each row's result is the same as without the map), tiles past the live count
write zeros and load nothing, and a tile across the count writes zeros for its dead rows. The count stays on the
device, so the launch is the same for every batch and a CUDA graph replays it.
"""
import torch
import triton
import triton.language as tl

from triton.runtime.errors import OutOfResources

from causal_conv1d.triton_utils import dot_tf32x3, launch, remember, tf32_round


@triton.jit
def _split_kernel(w_ptr, hi_ptr, lo_ptr, N, K, sw_n, sw_k, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N * K
    w = tl.load(w_ptr + (offs // K).to(tl.int64) * sw_n + (offs % K).to(tl.int64) * sw_k, mask=ok)
    hi = tf32_round(w)
    tl.store(hi_ptr + offs, hi, mask=ok)
    tl.store(lo_ptr + offs, tf32_round(w - hi), mask=ok)


@triton.jit
def _linear_kernel(x_ptr, wh_ptr, wl_ptr, bias_ptr, out_ptr, rows_ptr, live_ptr, M, N, K, seqlen, sx_r, sx_b, sx_t,
                   sx_k, HAS_BIAS: tl.constexpr, ROW_MAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # programs walk GROUP_M row tiles down each column of tiles, so a group's x rows and w columns stay in L2
    pid = tl.program_id(0)
    stack = tl.program_id(1).to(tl.int64)  # which of a stack of weights (x_proj's two directions)
    x_ptr += stack * sx_r
    wh_ptr += stack * N * K
    wl_ptr += stack * N * K
    bias_ptr += stack * N
    out_ptr += stack * M * N
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    mask_m, mask_n = slots < M, cols < N
    if ROW_MAP:
        rows = tl.load(rows_ptr + slots, mask=mask_m, other=0)
        live = tl.load(live_ptr)
        dead = pid_m * BLOCK_M >= live
    else:
        rows = slots
        dead = False
    out_p = out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    if dead:  # rows nobody reads: zeros, so that nothing uninitialised (a NaN) meets their masks downstream
        tl.store(out_p, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), mask=mask_m[:, None] & mask_n[None, :])
    else:
        # row m is token (m // seqlen, m % seqlen) of x's (batch, L) axes
        row_off = (rows // seqlen).to(tl.int64) * sx_b + (rows % seqlen).to(tl.int64) * sx_t
        x_p = x_ptr + row_off[:, None] + ks[None, :] * sx_k
        w_off = cols.to(tl.int64)[None, :] * K + ks[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask_k = (k0 + ks) < K
            x = tl.load(x_p, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            mask_w = mask_k[:, None] & mask_n[None, :]
            w_hi = tl.load(wh_ptr + w_off, mask=mask_w, other=0.0)
            w_lo = tl.load(wl_ptr + w_off, mask=mask_w, other=0.0)
            x_hi = tf32_round(x)
            # (each BLOCK_K step into a fresh tensor-core accumulator: dot_tf32x3)
            acc = dot_tf32x3(x_hi, tf32_round(x - x_hi), w_hi, w_lo, acc)
            x_p += BLOCK_K * sx_k
            w_off += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=mask_n, other=0.0)[None, :]
        if ROW_MAP:  # a tile across the live count: its dead rows are zeros too
            acc = tl.where((slots < live)[:, None], acc, 0.0)
        tl.store(out_p, acc, mask=mask_m[:, None] & mask_n[None, :])


# Tiles (rows, columns, depth, warps, stages). Triton's own tf32x3 (both operands split inside the kernel) had
# 128 x 128 x 32 with 8 warps and 3 stages for in_proj's 1536 columns and 128 x 64 x 32 for 384 and 768
# (benchmarks/results/linear_tiles_h200_2026-11-28.txt). With the weight split before and a fresh accumulator per
# step, 128 x 128 x 32, 8 warps, 3 stages was the fastest at 25216 rows and over DyVM's live rows (a row map) at
# every stage's share but one (linear_tf32_split_h200_2026-11-28.txt): launches with a row map keep it.
# Without a row map, 64 x 128 x 32 with 4 warps and 3 stages (linear_tiles_short_h200_2026-11-28.txt, H200, us,
# against 128 x 128 / 8 warps): the shorter sequences of DyVM inference fill the GPU's waves better (out_proj's
# forward 149 / 112 / 75 against 164 / 124 / 81 at 138 / 97 / 68 tokens, in_proj's 248 / 184 / 129 against
# 254 / 177 / 137, the input gradients 5% to 14% faster), and at 197 tokens out_proj's forward 199 against 219,
# in_proj's input gradient 343 against 355, in_proj's forward and out_proj's input gradient within 2%.
TILES = (64, 128, 32, 4, 3)
ROW_MAP_TILES = (128, 128, 32, 8, 3)
# Up to 64 columns (x_proj's 56): half as wide, from linear_tf32_split_h200_2026-11-28.txt's first probe (one
# accumulator): 36 against 69 us.
NARROW_N, NARROW_TILES = 64, (128, 64, 32, 8, 3)

_plans = {}  # eager inference is bound by the host: the same layer shapes come back on every forward


def split_tf32(w: torch.Tensor):
    """w (N, K) fp32 with any strides, or a contiguous stack (R, N, K) -> (hi, lo), each contiguous fp32 of w's shape
    holding exact TF32 values: hi = w rounded to TF32, lo = the rest rounded to TF32 (w = hi + lo to about 2^-22 of
    w). One launch; pass w.t() for the transposed weight (the input gradient's)."""
    if w.dim() not in (2, 3) or w.dtype != torch.float32 or (w.dim() == 3 and not w.is_contiguous()):
        raise ValueError(f"split_tf32: want an (N, K) or a contiguous stack (R, N, K) of fp32 weights, got "
                         f"{tuple(w.shape)} {w.dtype}")
    hi = torch.empty(w.shape, device=w.device, dtype=torch.float32)
    lo = torch.empty_like(hi)
    n, cols, block = w.numel(), w.shape[-1], 1024
    launch(_split_kernel, (triton.cdiv(n, block),), w, hi, lo, n // cols, cols, w.stride(-2), w.stride(-1), BLOCK=block)
    return hi, lo


def linear_tf32x3(x: torch.Tensor, w_hi: torch.Tensor, w_lo: torch.Tensor, bias=None, live_rows=None) -> torch.Tensor:
    """x (batch, L, K) fp32 (any strides), (w_hi, w_lo) = split_tf32(w) of an (N, K) weight, bias (N,) or None ->
    (batch, L, N) contiguous: x @ w^T + bias as three TF32 tensor-core products. A stack of weights: x (R, batch,
    L, K), the parts (R, N, K), bias (R, N) -> (R, batch, L, N), x[r] times weight r. live_rows: None, or (rows,
    live) as the module docstring says (the same rows in every x[r]): then only the live rows are computed and the
    others come out as zeros."""
    key = (x.shape, x.stride(), x.dtype, w_hi.shape, w_hi.stride(), w_hi.dtype, w_lo.shape, w_lo.stride(),
           w_lo.dtype, None if bias is None else bias.dtype, live_rows is not None)
    plan = _plans.get(key)
    if plan is None:
        plan = remember(_plans, key, _plan(x, w_hi, w_lo, bias, live_rows is not None))
    grid, ints, kwargs, out_shape = plan
    out = x.new_empty(out_shape)  # (x is fp32: _plan checks it)
    rows, live = (out, out) if live_rows is None else _checked(live_rows, x)  # (unread without the map)
    while True:
        try:
            launch(_linear_kernel, grid, x, w_hi, w_lo, w_hi if bias is None else bias, out, rows, live, *ints,
                   **kwargs)
            return out
        except OutOfResources:  # a GPU with less shared memory than the H200 the tiles were chosen on
            if kwargs["num_stages"] <= 1:
                raise
            kwargs["num_stages"] -= 1  # (in the cached plan too: the next call starts from what fitted)


def _plan(x, w_hi, w_lo, bias, row_map: bool):
    """The launch for these shapes and strides, checked once."""
    stacked = x.dim() == 4
    R = x.shape[0] if stacked else 1
    want_w = (R, *w_hi.shape[-2:]) if stacked else w_hi.shape[-2:]
    if (x.dim() not in (3, 4) or w_hi.shape != want_w or w_hi.shape[-1] != x.shape[-1] or not w_hi.is_contiguous()
            or w_lo.shape != w_hi.shape or not w_lo.is_contiguous()
            or x.dtype != torch.float32 or w_hi.dtype != torch.float32 or w_lo.dtype != torch.float32
            or (bias is not None
                and (bias.shape != w_hi.shape[:-1] or bias.dtype != torch.float32 or not bias.is_contiguous()))):
        raise ValueError(f"linear_tf32x3: x {tuple(x.shape)} {x.dtype}, weight parts {tuple(w_hi.shape)} "
                         f"{w_hi.dtype} / {tuple(w_lo.shape)} {w_lo.dtype} (split_tf32's, contiguous) and bias "
                         f"{None if bias is None else tuple(bias.shape)} do not fit")
    batch, seqlen, K = x.shape[-3:]
    N = w_hi.shape[-2]
    M = batch * seqlen
    block_m, block_n, block_k, warps, stages = (NARROW_TILES if N <= NARROW_N else
                                                 ROW_MAP_TILES if row_map else TILES)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n), R)
    ints = (M, N, K, max(seqlen, 1), x.stride(0) if stacked else 0, *x.stride()[-3:])
    kwargs = dict(HAS_BIAS=bias is not None, ROW_MAP=row_map, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                  GROUP_M=8, num_warps=warps, num_stages=stages)
    return grid, ints, kwargs, (*x.shape[:-1], N)


def _checked(live_rows, x):
    rows, live = live_rows
    if (rows.shape != (x.shape[-3] * x.shape[-2],) or rows.dtype != torch.int32 or rows.stride(0) != 1
            or live.numel() != 1 or live.dtype != torch.int32 or rows.device != x.device or live.device != x.device):
        raise ValueError(f"linear_tf32x3: live rows {tuple(rows.shape)} {rows.dtype} and count {tuple(live.shape)} "
                         f"{live.dtype} do not fit x {tuple(x.shape)} (want (batch * L,) and (1,) int32 on its device)")
    return rows, live
