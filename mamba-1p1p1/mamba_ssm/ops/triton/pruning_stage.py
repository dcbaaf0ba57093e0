"""DyVM's token-pruning stage at inference, in four kernels and the predictor's four matmuls instead of some
forty small ops.

A stage (dyvm.models.dyvm.DyVM._prune) rates the patch tokens with a predictor whose first op is a LayerNorm of
hidden + residual without the class token, keeps the k best, and gathers them, with the class token moved to
its new place, from both streams. Eagerly and in CUDA graphs those were an add, a concatenation, the LayerNorm
and a cast (each a full pass over the sequence), the predictor's GELU and policy-weighted mean, then top-k,
a sort, four index ops, three gathers and the decision mask: launches that dense Vim does not have, and eager
inference is bound by the host's launches (docs/speed.md).

- `patch_layer_norm`: LayerNorm(hidden + residual) of the patch rows (the class token's row skipped), in fp32
  as torch's LayerNorm computes it under autocast, written once in the dtype the predictor's first Linear
  reads (autocast's, else fp32). Only the order of the fp32 sums differs from torch's kernel.
- `pool_concat`: the predictor's GELU after its first Linear and its policy-weighted mean of the second half
  of the channels, written as the next Linear's input [local half, mean] (TokenScorePredictor._pool). GELU,
  products and the division as torch computes them (erf, IEEE division); only the order of the mean's fp32 sum
  differs.
- `select_top_k`: the k best slots by score in ascending slot order (torch.topk then a sort), the decision mask
  over the original patches and the next policy (ones), per sample in one program. Ties resolve as torch.topk's
  CUDA kernel resolves them: by its radix order of the values (-0.0 below +0.0, NaN above everything), then the
  lower slot first. Equal to the ops bit for bit.
- `gather_stage`: the kept rows of hidden and residual, the class token's row moved to its new position, and
  the kept slots' patch indices, in one pass. Pure copies: equal to the gathers bit for bit.

One class token at a position that is the same for every image (Vim, VideoMamba); the callers keep the plain
ops for the rest (several registers, per-image positions, training, torch.compile).
"""
import torch
import triton
import triton.language as tl

from causal_conv1d.triton_utils import cdiv, launch, next_pow2, row_blocks


@triton.jit
def _patch_norm_kernel(h_ptr, r_ptr, w_ptr, b_ptr, out_ptr, n_rows, n_slots, n_cols, cls_pos, eps,
                       sh_b, sh_l, sr_b, sr_l,
                       HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # patch rows (sample, slot), flattened
    cols = tl.arange(0, BLOCK_N)
    mask_r = rows < n_rows
    mask_c = cols < n_cols
    mask = mask_r[:, None] & mask_c[None, :]
    b = (rows // n_slots).to(tl.int64)
    slot = rows % n_slots
    src = slot + (slot >= cls_pos).to(tl.int32)  # the sequence row: slots at or past the class token move one on
    x = tl.load(h_ptr + (b * sh_b + src * sh_l)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(r_ptr + (b * sr_b + src * sr_l)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + bias[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * n_cols + cols[None, :], y.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _stage_gather_kernel(h_ptr, r_ptr, index_ptr, s2p_ptr, h_out_ptr, r_out_ptr, s2p_out_ptr,
                         n_rows, n_keep, n_slots, n_cols, cls_pos, new_cls_pos,
                         sh_b, sh_l, sr_b, sr_l,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # output rows (sample, position), flattened
    cols = tl.arange(0, BLOCK_N)
    mask_r = rows < n_rows
    b = (rows // (n_keep + 1)).to(tl.int64)
    pos = rows % (n_keep + 1)
    is_cls = pos == new_cls_pos
    slot = pos - (pos > new_cls_pos).to(tl.int32)  # the output's patch slot (meaningless for the class row)
    mask_s = mask_r & (~is_cls)
    kept = tl.load(index_ptr + b * n_keep + slot, mask=mask_s, other=0)  # the input slot kept there
    src = tl.where(is_cls, cls_pos, kept + (kept >= cls_pos).to(kept.dtype))
    tl.store(s2p_out_ptr + b * n_keep + slot, tl.load(s2p_ptr + b * n_slots + kept, mask=mask_s), mask=mask_s)
    mask = mask_r[:, None] & (cols < n_cols)[None, :]
    out_offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    h = tl.load(h_ptr + (b * sh_b + src * sh_l)[:, None] + cols[None, :], mask=mask)
    tl.store(h_out_ptr + out_offs, h, mask=mask)
    r = tl.load(r_ptr + (b * sr_b + src * sr_l)[:, None] + cols[None, :], mask=mask)
    tl.store(r_out_ptr + out_offs, r, mask=mask)


@triton.jit
def _gelu(x):
    """torch's exact GELU in fp32, in its CUDA kernel's order: x * 0.5 * (1 + erf(x * M_SQRT1_2))."""
    return x * 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """fp32 x -> dtype, rounded to nearest even as the GPU's conversion rounds. Triton's interpreter truncates to
    bf16 instead, so bf16 is rounded here first (the conversion is then exact on both, and the CPU tests see what
    the GPU computes); NaN stays NaN."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)
    return x.to(dtype)


@triton.jit
def _pool_concat_kernel(x_ptr, policy_ptr, out_ptr, n_slots, half, sx_b, sx_n, sp_b, sp_n,
                        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (sample, block of the half's channels): GELU of x's rows into out's first half, then the
    policy-weighted mean over the slots of GELU(x)'s second half (GELU rounded to x's dtype first, as torch's
    GELU writes it) into every row of out's second half."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < half
    acc = tl.zeros((BLOCK_C,), tl.float32)
    kept = tl.zeros((BLOCK_T,), tl.float32)
    for t0 in range(0, n_slots, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        mask_t = rows < n_slots
        mask = mask_t[:, None] & mask_c[None, :]
        x_offs = (b * sx_b + rows * sx_n)[:, None] + cols[None, :]
        out_offs = ((b * n_slots + rows) * (2 * half))[:, None] + cols[None, :]
        local = _gelu(tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32))
        tl.store(out_ptr + out_offs, _round_to(local, out_ptr.dtype.element_ty), mask=mask)
        g = _gelu(tl.load(x_ptr + x_offs + half, mask=mask, other=0.0).to(tl.float32))
        p = tl.load(policy_ptr + b * sp_b + rows * sp_n, mask=mask_t, other=0.0).to(tl.float32)
        acc += tl.sum(_round_to(g, x_ptr.dtype.element_ty).to(tl.float32) * p[:, None], axis=0)
        kept += p
    pooled = tl.math.div_rn(acc, tl.zeros((BLOCK_C,), tl.float32) + (tl.sum(kept, axis=0) + 1.0))
    pooled = _round_to(pooled, out_ptr.dtype.element_ty)
    for t0 in range(0, n_slots, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        mask = (rows < n_slots)[:, None] & mask_c[None, :]
        out_offs = ((b * n_slots + rows) * (2 * half))[:, None] + cols[None, :]
        tl.store(out_ptr + out_offs + half, tl.zeros((BLOCK_T, BLOCK_C), out_ptr.dtype.element_ty) + pooled[None, :],
                 mask=mask)


@triton.jit
def _radix_key(v):
    """fp32 -> uint32 in torch.topk's radix order (its TopKTypeConfig<float>): sign-flipped bits, NaN highest."""
    bits = v.to(tl.uint32, bitcast=True)
    flip = tl.where((bits & 0x80000000) != 0, 0xFFFFFFFF, 0x80000000).to(tl.uint32)
    return tl.where(v == v, bits ^ flip, 0xFFFFFFFF)


@triton.jit
def _select_kernel(score_ptr, s2p_ptr, index_ptr, decision_ptr, policy_ptr, n_slots, n_keep, n_patches,
                   ss_b, ss_n, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program per sample. Slot i's rank: the slots with a higher key, and those with an equal key and a lower
    slot (torch.topk's order); the k of rank below k are kept, written in ascending slot order at their count of
    kept slots before them. decision (n_patches,): 1 at the kept slots' patches (zeroed first: the scatter
    writes into the row this program zeroed, after a barrier), policy (k,): ones."""
    b = tl.program_id(0).to(tl.int64)
    for m0 in range(0, n_patches, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        tl.store(decision_ptr + b * n_patches + m, tl.zeros((BLOCK_M,), tl.float32), mask=m < n_patches)
    tl.debug_barrier()
    written = 0
    for i0 in range(0, n_slots, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        mask_i = i < n_slots
        key_i = _radix_key(tl.load(score_ptr + b * ss_b + i * ss_n, mask=mask_i, other=0.0).to(tl.float32))
        rank = tl.zeros((BLOCK_I,), tl.int32)
        for j0 in range(0, n_slots, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            mask_j = j < n_slots
            key_j = _radix_key(tl.load(score_ptr + b * ss_b + j * ss_n, mask=mask_j, other=0.0).to(tl.float32))
            ahead = (key_j[None, :] > key_i[:, None]) | ((key_j[None, :] == key_i[:, None]) & (j[None, :] < i[:, None]))
            rank += tl.sum((ahead & mask_j[None, :]).to(tl.int32), axis=1)
        keep = mask_i & (rank < n_keep)
        keep_i = keep.to(tl.int32)
        pos = written + tl.cumsum(keep_i, axis=0) - keep_i
        tl.store(index_ptr + b * n_keep + pos, i.to(tl.int64), mask=keep)
        tl.store(policy_ptr + b * n_keep + pos, tl.zeros((BLOCK_I,), tl.float32) + 1.0, mask=keep)
        patch = tl.load(s2p_ptr + b * n_slots + i, mask=keep, other=0)
        tl.store(decision_ptr + b * n_patches + patch, tl.zeros((BLOCK_I,), tl.float32) + 1.0, mask=keep)
        written += tl.sum(keep_i, axis=0)


def _check_rows(name: str, t: torch.Tensor, shape: tuple):
    if tuple(t.shape) != shape or t.stride(-1) != 1:
        raise ValueError(f"pruning stage: {name} must be {shape} with contiguous rows, got {tuple(t.shape)} "
                         f"strides {tuple(t.stride())}")


def patch_layer_norm(hidden: torch.Tensor, residual, cls_position: int, weight: torch.Tensor, bias: torch.Tensor,
                     eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """hidden, residual (B, L, C) (residual may be None) -> (B, L-1, C) in out_dtype: F.layer_norm of
    hidden + residual in fp32, the row at cls_position left out (dyvm.pruning.split_cls's patch tokens)."""
    batch, length, n_cols = hidden.shape
    _check_rows("hidden", hidden, (batch, length, n_cols))
    if residual is not None:
        _check_rows("residual", residual, (batch, length, n_cols))
    if (weight.shape != (n_cols,) or bias.shape != (n_cols,) or not isinstance(cls_position, int)
            or not 0 <= cls_position < length):
        raise ValueError(f"pruning stage: LayerNorm of width {tuple(weight.shape)} / class position {cls_position} "
                         f"do not fit a sequence of {length} tokens of width {n_cols}")
    n_slots = length - 1
    out = torch.empty((batch, n_slots, n_cols), device=hidden.device, dtype=out_dtype)
    n_rows = batch * n_slots
    block_m, block_n = row_blocks(n_cols)
    res = residual if residual is not None else hidden
    launch(_patch_norm_kernel, (-(-n_rows // block_m),), hidden, res, weight, bias, out, n_rows, n_slots, n_cols,
           cls_position, float(eps), hidden.stride(0), hidden.stride(1), res.stride(0), res.stride(1),
           HAS_RES=residual is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return out


def gather_stage(hidden: torch.Tensor, residual: torch.Tensor, slot_to_patch: torch.Tensor, index: torch.Tensor,
                 cls_position: int, new_cls_position: int):
    """hidden, residual (B, N+1, C) with the class token at cls_position, slot_to_patch (B, N), index (B, k)
    of the patch slots to keep (ascending) -> hidden and residual (B, k+1, C) holding those slots' rows with the
    class token's row at new_cls_position, and slot_to_patch (B, k) of the kept slots (what
    dyvm.pruning.gather_index, two batch_gathers and slot_to_patch.gather(1, index) compute)."""
    batch, length, n_cols = hidden.shape
    n_keep = index.shape[1]
    _check_rows("hidden", hidden, (batch, length, n_cols))
    _check_rows("residual", residual, (batch, length, n_cols))
    if (slot_to_patch.shape != (batch, length - 1) or index.shape != (batch, n_keep) or index.dtype != torch.int64
            or slot_to_patch.dtype != torch.int64 or not isinstance(cls_position, int)
            or not isinstance(new_cls_position, int) or not 0 <= cls_position < length
            or not 0 <= new_cls_position <= n_keep):
        raise ValueError(f"pruning stage: index {tuple(index.shape)} {index.dtype}, slot_to_patch "
                         f"{tuple(slot_to_patch.shape)} {slot_to_patch.dtype} and class positions {cls_position} -> "
                         f"{new_cls_position} do not fit a sequence of {length} tokens")
    index, slot_to_patch = index.contiguous(), slot_to_patch.contiguous()
    h_out = torch.empty((batch, n_keep + 1, n_cols), device=hidden.device, dtype=hidden.dtype)
    r_out = torch.empty((batch, n_keep + 1, n_cols), device=hidden.device, dtype=residual.dtype)
    s2p_out = torch.empty((batch, n_keep), device=hidden.device, dtype=torch.int64)
    n_rows = batch * (n_keep + 1)
    block_m, block_n = row_blocks(n_cols)
    launch(_stage_gather_kernel, (-(-n_rows // block_m),), hidden, residual, index, slot_to_patch, h_out, r_out,
           s2p_out, n_rows, n_keep, length - 1, n_cols, cls_position, new_cls_position,
           hidden.stride(0), hidden.stride(1), residual.stride(0), residual.stride(1),
           BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return h_out, r_out, s2p_out


def pool_concat(x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """x (B, N, C): the predictor's first Linear's output (before its GELU), policy (B, N) fp32 -> (B, N, C) in x's
    dtype: [GELU(x)[..., :C/2], the policy-weighted mean of GELU(x)[..., C/2:] over the N slots divided by (kept
    + 1)], what dyvm.models.predictor.TokenScorePredictor._pool computes (its mean in fp32, rounded to x's dtype
    as the next Linear's autocast cast rounds it)."""
    batch, n_slots, n_cols = x.shape
    if (x.stride(-1) != 1 or n_cols % 2 or policy.shape != (batch, n_slots) or policy.dtype != torch.float32
            or x.dtype not in (torch.float32, torch.bfloat16, torch.float16)):
        raise ValueError(f"pruning stage: features {tuple(x.shape)} {x.dtype} (an even width, contiguous rows) and "
                         f"policy {tuple(policy.shape)} {policy.dtype} (fp32, one per slot) do not fit")
    half = n_cols // 2
    out = torch.empty((batch, n_slots, n_cols), device=x.device, dtype=x.dtype)
    block_c = min(64, next_pow2(half))
    launch(_pool_concat_kernel, (batch, cdiv(half, block_c)), x, policy, out, n_slots, half, x.stride(0),
           x.stride(1), policy.stride(0), policy.stride(1), BLOCK_T=32, BLOCK_C=block_c, num_warps=4)
    return out


def select_top_k(score: torch.Tensor, slot_to_patch: torch.Tensor, n_keep: int, n_patches: int):
    """score (B, N) (any strides), slot_to_patch (B, N) int64 -> (index (B, k) int64 of the k best slots in
    ascending order: torch.topk(score, k).indices sorted; decision (B, n_patches) fp32, 1 at those slots'
    patches: dyvm.pruning.indices_to_mask of their slot_to_patch; policy (B, k) fp32 ones)."""
    batch, n_slots = score.shape
    if (slot_to_patch.shape != (batch, n_slots) or slot_to_patch.dtype != torch.int64
            or not 0 <= n_keep <= n_slots or not score.is_floating_point()):
        raise ValueError(f"pruning stage: scores {tuple(score.shape)} {score.dtype}, slot_to_patch "
                         f"{tuple(slot_to_patch.shape)} {slot_to_patch.dtype} and {n_keep} kept do not fit")
    slot_to_patch = slot_to_patch.contiguous()
    index = torch.empty((batch, n_keep), device=score.device, dtype=torch.int64)
    decision = torch.empty((batch, n_patches), device=score.device, dtype=torch.float32)
    policy = torch.empty((batch, n_keep), device=score.device, dtype=torch.float32)
    launch(_select_kernel, (batch,), score, slot_to_patch, index, decision, policy, n_slots, n_keep, n_patches,
           score.stride(0), score.stride(1), BLOCK_I=64, BLOCK_J=64, BLOCK_M=256, num_warps=4)
    return index, decision, policy
