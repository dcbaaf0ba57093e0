"""DyVM's gate head at inference as one kernel: the class token's column of xz -> Linear(2 d_inner, 2) -> > 0.

In eager inference the head was three launches per layer (the column read, the Linear, the comparison), each
with its host work, on a path bound by the host. The kernel computes what those ops compute: the column and
the weights in the logits' dtype (autocast's, as autocast casts the Linear's inputs; the weights are cast on
the host, which is free for the cached inference weights), products summed in fp32 with the bias, then the
sign (sigmoid(l) > 0.5 exactly when l > 0; rounding the logit to a narrower dtype first keeps its sign). Only
the order of the fp32 sum differs from cuBLAS's, so a decision can differ only for a logit within fp32
rounding of zero. Writes the 0/1 gates (batch, 2) in the logits' dtype.
"""
import torch
import triton
import triton.language as tl

from causal_conv1d.triton_utils import launch, next_pow2


@triton.jit
def _gate_head_kernel(xz_ptr, w_ptr, b_ptr, out_ptr, width, column, sxz_b, sxz_c, sxz_t, sw_r, so_b, so_r,
                      BLOCK: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, 2)  # the two directions' logits
    acc = tl.zeros((2, BLOCK), dtype=tl.float32)
    for start in range(0, width, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < width
        x = tl.load(xz_ptr + pid_b * sxz_b + offs * sxz_c + column * sxz_t, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * sw_r + offs[None, :], mask=ok[None, :], other=0.0).to(tl.float32)
        acc += x[None, :] * w
    logits = tl.sum(acc, axis=1) + tl.load(b_ptr + rows).to(tl.float32)
    gates = tl.where(logits > 0, 1.0, 0.0)
    tl.store(out_ptr + pid_b * so_b + rows * so_r, gates.to(out_ptr.dtype.element_ty))


def gate_head_decide(xz: torch.Tensor, column: int, weight: torch.Tensor, bias: torch.Tensor,
                     out: torch.Tensor) -> torch.Tensor:
    """xz (b, 2 d_inner, L) in out's dtype, weight (2, 2 d_inner), bias (2,) -> out (b, 2) written with
    (xz[:, :, column] @ weight.T + bias > 0), the weights taken in out's dtype (see the module docstring)."""
    batch, width, _ = xz.shape
    if weight.shape != (2, width) or bias.shape != (2,) or out.shape != (batch, 2) or xz.dtype != out.dtype:
        raise ValueError(f"gate head: weight {tuple(weight.shape)}, bias {tuple(bias.shape)} and out "
                         f"{tuple(out.shape)} {out.dtype} do not fit xz {tuple(xz.shape)} {xz.dtype}")
    # (no-ops for the cached inference weights, which are in the autocast dtype already)
    weight, bias = weight.to(out.dtype).contiguous(), bias.to(out.dtype).contiguous()
    launch(_gate_head_kernel, (batch,), xz, weight, bias, out, width, column, *xz.stride(), weight.stride(0),
           *out.stride(), BLOCK=min(next_pow2(width), 2048), num_warps=4)
    return out
