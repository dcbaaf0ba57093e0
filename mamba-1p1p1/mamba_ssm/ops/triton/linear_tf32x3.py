"""fp32 Linear layers on TF32 tensor cores as three products: out = x @ w^T (+ bias), fp32 in and out.

cuBLAS multiplies fp32 on the CUDA cores (torch's default, allow_tf32 off): at Vim-S training shapes (25216 token
rows) in_proj's forward took 610 us on an H200. TF32 tensor cores are several times faster but keep 10 mantissa
bits. Split each fp32 operand into a TF32 part and a TF32 remainder, a = a_hi + a_lo, and sum three tensor-core
products, a_hi b_hi + a_hi b_lo + a_lo b_hi (Triton's input_precision "tf32x3"): the dropped a_lo b_lo is about
2^-22 of each product, and the fp32 accumulation runs in blocks of the reduction, so the result is closer to the
fp64 product than cuBLAS's fp32 one (1.5e-7 against 3.5e-7 to 7e-7 relative at Vim-S shapes), in 420 against 610
us (benchmarks/results/linear_tf32x3_probe_h200_2026-11-28.txt).

x is (batch, L, K) with any strides (out_proj reads a transposed view); w is (N, K) K-contiguous, as both the
forward (w = the weight) and the input gradient (w = the weight transposed, copied once: 2.4 MB at in_proj's
size) give it. The output is (batch, L, N) contiguous. A leaf: the op layer is mamba_ssm.ops.linear_fp32.

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

from causal_conv1d.triton_utils import launch, remember


@triton.jit
def _linear_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, rows_ptr, live_ptr, M, N, K, seqlen, sx_b, sx_t, sx_k, sw_n,
                   HAS_BIAS: tl.constexpr, ROW_MAP: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # programs walk GROUP_M row tiles down each column of tiles, so a group's x rows and w columns stay in L2
    pid = tl.program_id(0)
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
        w_p = w_ptr + cols.to(tl.int64)[None, :] * sw_n + ks[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask_k = (k0 + ks) < K
            x = tl.load(x_p, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_p, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
            x_p += BLOCK_K * sx_k
            w_p += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=mask_n, other=0.0)[None, :]
        if ROW_MAP:  # a tile across the live count: its dead rows are zeros too
            acc = tl.where((slots < live)[:, None], acc, 0.0)
        tl.store(out_p, acc, mask=mask_m[:, None] & mask_n[None, :])


# Tiles (rows, columns, depth, warps, stages) by output width, from the sweep of .device/mm_probe.py at Vim-S
# training shapes (H200, 25216 rows; us, against cuBLAS fp32): 1536 columns (in_proj) 128 x 128 x 32, 8 warps,
# 3 stages: 420 against 610; 384 and 768 columns (in_proj's input gradient, out_proj both ways) 128 x 64 x 32,
# then with 4 warps and 4 stages: 438 / 225 / 290 against 684 / 381 / 329 (128 x 256 tiles and 16-deep steps were
# slower). 8 warps and 3 stages since (benchmarks/results/linear_tiles_h200_2026-11-28.txt, 128 x 197 / 138 / 98 / 68
# rows, DyVM's stages): in_proj's input gradient 418 / 318 / 231 / 184 against 448 / 358 / 272 / 183, out_proj's
# forward 216 / 165 / 120 / 95 against 232 / 186 / 141 / 95, its input gradient equal or faster; but over live rows
# (a row map) 8 warps were slower (out_proj's input gradient 211 / 159 / 121 against 180 / 131 / 103 us at the
# three stages' shares), so the row map keeps 4 warps and 4 stages ("narrow rows").
WIDE_N = 1024
TUNING = {"wide": (128, 128, 32, 8, 3), "narrow": (128, 64, 32, 8, 3), "narrow rows": (128, 64, 32, 4, 4)}

_plans = {}  # eager inference is bound by the host: the same layer shapes come back on every forward


def linear_tf32x3(x: torch.Tensor, w: torch.Tensor, bias=None, precision: str = "tf32x3",
                  live_rows=None) -> torch.Tensor:
    """x (batch, L, K) fp32 (any strides), w (N, K) fp32 K-contiguous, bias (N,) or None -> (batch, L, N)
    contiguous: x @ w^T + bias as three TF32 tensor-core products (precision: Triton's input_precision; the
    others are for tests and probes). live_rows: None, or (rows, live) as the module docstring says: then only
    the live rows are computed and the others come out as zeros."""
    key = (x.shape, x.stride(), x.dtype, w.shape, w.stride(), w.dtype, None if bias is None else bias.dtype,
           precision, live_rows is not None)
    plan = _plans.get(key)
    if plan is None:
        plan = remember(_plans, key, _plan(x, w, bias, precision, live_rows is not None))
    grid, ints, kwargs, out_shape = plan
    out = torch.empty(out_shape, device=x.device, dtype=torch.float32)
    rows, live = (out, out) if live_rows is None else _checked(live_rows, x)  # (unread without the map)
    while True:
        try:
            launch(_linear_kernel, grid, x, w, w if bias is None else bias, out, rows, live, *ints, **kwargs)
            return out
        except OutOfResources:  # a GPU with less shared memory than the H200 the tiles were chosen on
            if kwargs["num_stages"] <= 1:
                raise
            kwargs["num_stages"] -= 1  # (in the cached plan too: the next call starts from what fitted)


def _plan(x, w, bias, precision, row_map: bool):
    """The launch for these shapes and strides, checked once."""
    if (x.dim() != 3 or w.dim() != 2 or w.shape[1] != x.shape[2] or w.stride(1) != 1
            or x.dtype != torch.float32 or w.dtype != torch.float32
            or (bias is not None
                and (bias.shape != w.shape[:1] or bias.dtype != torch.float32 or bias.stride(0) != 1))):
        raise ValueError(f"linear_tf32x3: x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)} {w.dtype} (K-contiguous) "
                         f"and bias {None if bias is None else tuple(bias.shape)} do not fit")
    batch, seqlen, K = x.shape
    N = w.shape[0]
    M = batch * seqlen
    block_m, block_n, block_k, warps, stages = TUNING["wide" if N >= WIDE_N else "narrow rows" if row_map else "narrow"]
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    ints = (M, N, K, max(seqlen, 1), x.stride(0), x.stride(1), x.stride(2), w.stride(0))
    kwargs = dict(HAS_BIAS=bias is not None, ROW_MAP=row_map, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n,
                  BLOCK_K=block_k, GROUP_M=8, num_warps=warps, num_stages=stages)
    return grid, ints, kwargs, (batch, seqlen, N)


def _checked(live_rows, x):
    rows, live = live_rows
    if (rows.shape != (x.shape[0] * x.shape[1],) or rows.dtype != torch.int32 or rows.stride(0) != 1
            or live.numel() != 1 or live.dtype != torch.int32 or rows.device != x.device or live.device != x.device):
        raise ValueError(f"linear_tf32x3: live rows {tuple(rows.shape)} {rows.dtype} and count {tuple(live.shape)} "
                         f"{live.dtype} do not fit x {tuple(x.shape)} (want (batch * L,) and (1,) int32 on its device)")
    return rows, live
