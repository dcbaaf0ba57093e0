"""Partial sums added up in one launch: the kernels' per-sample (or per-block) rows of gradients, each (P, n, Q)
summed over n into (P, Q) fp32, in a fixed order (deterministic, no atomics).

A backward kernel that cannot sum over the batch itself writes a row per sample: the conv's dweight and dbias, the
scan's dA and its dD with d delta_bias. torch.sum over the middle axis took one launch each, 6 to 8 us apiece at Vim-S
training shapes (batch 128) on an H200, for a few MB read; sum_middle adds up to three such buffers in one launch:
the scan's dA with dD and d delta_bias 3.7 us against torch's 8.3 for both, the conv's dweight with dbias 2.4 against
7.7 (graph replays; benchmarks/results/train_small_ops_h200_2026-11-29.txt). Each program takes BLOCK_Q columns of
one buffer and walks its n rows BLOCK_N at a time, then sums the tile's rows (a fixed tree): the same order for every
call. (x_proj's and dt_proj's weight gradients add their blocks of samples with it too.)
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from causal_conv1d.triton_utils import cdiv, launch

# A tile's rows x columns. At Vim-S's shapes (scan / conv sums): 64 x 64 3.7 / 2.4 us, 32 x 128 4.0 / 3.3, 16 x 128
# 6.3 / 5.9, 8 x 128 5.0 / 4.6
BLOCK_N, BLOCK_Q = 64, 64


@triton.jit
def _sum_tile(src, dst, tile, n, q, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr):
    """dst[p, cols] = sum over k of src[p, k, cols] for tile = p * cdiv(q, BLOCK_Q) + the columns' block."""
    q_tiles = tl.cdiv(q, BLOCK_Q)
    p = (tile // q_tiles).to(tl.int64)
    cols = (tile % q_tiles) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    in_cols = cols < q
    base = src + p * n * q
    acc = tl.zeros((BLOCK_N, BLOCK_Q), dtype=tl.float32)
    for k0 in range(0, n, BLOCK_N):
        rows = k0 + tl.arange(0, BLOCK_N)
        acc += tl.load(base + rows[:, None] * q + cols[None, :], mask=(rows < n)[:, None] & in_cols[None, :],
                       other=0.0).to(tl.float32)
    tl.store(dst + p * q + cols, tl.sum(acc, axis=0), mask=in_cols)


@triton.jit
def _sum_middle_kernel(src0, dst0, n0, q0, tiles0, src1, dst1, n1, q1, tiles1, src2, dst2, n2, q2,
                       BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Programs [0, tiles0) sum buffer 0's tiles, the next tiles1 buffer 1's, the rest buffer 2's."""
    pid = tl.program_id(0)
    if pid < tiles0:
        _sum_tile(src0, dst0, pid, n0, q0, BLOCK_N, BLOCK_Q)
    elif pid < tiles0 + tiles1:
        _sum_tile(src1, dst1, pid - tiles0, n1, q1, BLOCK_N, BLOCK_Q)
    else:
        _sum_tile(src2, dst2, pid - tiles0 - tiles1, n2, q2, BLOCK_N, BLOCK_Q)


def sum_middle(*parts: Optional[Tensor]) -> tuple:
    """Each given (P, n, Q) tensor (contiguous, up to three; None passes through) summed over n into a (P, Q) fp32
    tensor, all in one launch."""
    if len([t for t in parts if t is not None]) > 3:
        raise ValueError("sum_middle takes up to three tensors a launch")
    outs, args, total = [], [], 0
    for t in parts:
        if t is None:
            outs.append(None)
            continue
        if t.dim() != 3 or not t.is_contiguous():
            raise ValueError(f"sum_middle takes contiguous (P, n, Q) tensors, got {tuple(t.shape)} with strides "
                             f"{t.stride()}")
        p, n, q = t.shape
        out = torch.empty((p, q), device=t.device, dtype=torch.float32)
        outs.append(out)
        tiles = p * cdiv(q, BLOCK_Q)
        args.append((t, out, n, q, tiles))
        total += tiles
    if total:
        while len(args) < 3:  # (unused slots: no programs reach them)
            args.append((args[0][0], args[0][1], 0, 1, 0))
        flat = [v for a in args for v in a]
        del flat[-1]  # (the last buffer's tile count is implied)
        launch(_sum_middle_kernel, (total,), *flat, BLOCK_N=BLOCK_N, BLOCK_Q=BLOCK_Q, num_warps=4)
    return tuple(outs)
