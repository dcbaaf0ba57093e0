"""DyVM's token-pruning stage at inference, in two kernels instead of some fifteen small ops.

A stage (dyvm.models.dyvm.DyVM._prune) rates the patch tokens with a predictor whose first op is a LayerNorm of
hidden + residual without the class token, keeps the k best, and gathers them, with the class token moved to
its new place, from both streams. Eagerly and in CUDA graphs those were an add, a concatenation, the LayerNorm
and a cast (each a full pass over the sequence), then four index ops and three gathers: launches and passes
that dense Vim does not have, about 1 ms of a 11 ms DyVM-S forward (bf16, batch 128, H200).

- `patch_layer_norm`: LayerNorm(hidden + residual) of the patch rows (the class token's row skipped), in fp32
  as torch's LayerNorm computes it under autocast, written once in the dtype the predictor's first Linear
  reads (autocast's, else fp32). Only the order of the fp32 sums differs from torch's kernel.
- `gather_stage`: the kept rows of hidden and residual, the class token's row moved to its new position, and
  the kept slots' patch indices, in one pass. Pure copies: equal to the gathers bit for bit.

One class token at a position that is the same for every image (Vim, VideoMamba); the callers keep the plain
ops for the rest (several registers, per-image positions, training, torch.compile).
"""
import torch
import triton
import triton.language as tl

from causal_conv1d.triton_utils import launch, row_blocks


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
