"""The mixers' Linear layers (in_proj, out_proj) in fp32 on a GPU: three TF32 tensor-core products instead of
cuBLAS's CUDA-core fp32 (mamba_ssm.ops.triton.linear_tf32x3 says how, and how close to fp64 it is). x_proj's
forward takes the same kernel where tf32x3_applies (mamba_ssm.ops.bimamba_stacked._x_proj_matmul), and so do DyVM's
token-score predictors' Linears (dyvm.models.predictor, through linear_module as the mixers' Linears). DyVM's gated
inference takes x_proj and dt_proj of the pairs that are on as three TF32 products in its own kernel where
tf32x3_wanted (mamba_ssm.ops.triton.gated_proj, with the weights' parts from weight_parts).

`linear(x, weight, bias)` is F.linear(x, weight, bias). It takes the kernel where all of this holds, and F.linear
otherwise: fp32 input and weight with no autocast (under autocast F.linear runs in the autocast dtype), TF32 matmuls
not allowed (with `--tf32` the user asked for cuBLAS's plain TF32, which is faster), (batch, L, K) input of at least
MIN_ROWS tokens (it was measured at 8704 to 25216 rows; tiny inputs keep cuBLAS), a GPU with TF32 tensor cores
(compute capability 8.0 or later) or the interpreter in tests, nothing tracing or watching the ops (torch.compile,
FLOP counters, fake tensors see F.linear), and ENABLED (False: cuBLAS throughout, for A/B runs; also
MAMBA_FP32_LINEAR=cublas). The kernel takes the weight split into two TF32 parts (split_tf32, one small launch per
call; inference keeps the parts with the layer's cached weights: `memo`). The backward: the input's gradient by
the same kernel (the transposed weight split), the weight's by cuBLAS in fp32 as F.linear's backward computes it
(a kernel was no faster there: 555 against 580 us at in_proj's size), the bias's as a sum over tokens.

Autocast training (16-bit): linear_module runs the Linear as autocast does, but sums the weight's gradient in fp32
straight into the fp32 weight (_AutocastLinear with matmul_fp32_out) instead of a 16-bit product cast to fp32
after it: in_proj's 56.4 against 58.4 us, out_proj's 32.2 against 34.3 at Vim-S bf16 training shapes on an H200, a
launch fewer each (train_small_ops_h200_2026-11-29.txt).

Live rows (`LiveRows`): in DyVM training after a pruning stage each image's pruned tokens sit masked behind its
kept ones, and no loss term reads them (dyvm.models.dyvm.SCAN_KEPT_ONLY). A mixer's in_proj and out_proj then need
only each image's first rows (and the conv's reach past them): given a LiveRows, the kernel computes those rows,
forward and input gradient, and writes zeros for the others. The caller vouches that nothing reads those rows and
that they add nothing to the weight's gradient (out_proj's input and in_proj's output gradient are zero there).
F.linear, where the kernel does not apply, computes every row; the results are the same (bit for bit on an H200 with
the same tiles, benchmarks/results/linear_live_rows_h200_2026-11-28.txt; and with the narrower tiles that launches
without a row map take since, linear_tiles_training_h200_2026-11-28.txt: a whole DyVM-S training step too).
"""
import os
import warnings
from functools import lru_cache
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules import module as _nn_module
from torch.autograd.function import once_differentiable

from causal_conv1d.kernel_utils import kept_in, needs_grad, ops_watched, tf32_matmuls_allowed, triton_enabled
from causal_conv1d.launch_replay import eager_replays_apply, replayed

KERNELS = "mamba_ssm.ops.triton.linear_tf32x3"
ENABLED = os.environ.get("MAMBA_FP32_LINEAR", "tf32x3") != "cublas"
MIN_ROWS = 1024


@lru_cache(maxsize=None)
def _has_tf32_cores(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


_NO_ROOM = set()  # devices where even one pipeline stage of the kernel's tiles did not fit: F.linear there


def tf32x3_applies(x: Tensor, weight: Tensor) -> bool:
    """Whether linear(x, weight, ...) takes the kernel (see the module docstring); x (batch, L, K) with weight (N, K),
    or a stack x (R, batch, L, K) with weights (R, N, K) (x_proj's two directions)."""
    return (weight.dtype == torch.float32 and x.dim() in (3, 4) and weight.dim() == x.dim() - 1
            and x.shape[-3] * x.shape[-2] >= MIN_ROWS and tf32x3_wanted(x))


def tf32x3_wanted(x: Tensor) -> bool:
    """The conditions of tf32x3_applies that are not about shapes: fp32 products of x on TF32 tensor cores as three
    TF32 products, here (the kernel) or in another kernel that does so (gated_proj's fp32 projections)."""
    if not ENABLED or x.dtype != torch.float32 or tf32_matmuls_allowed():
        return False
    device = x.device
    return (not torch.is_autocast_enabled(device.type) and not ops_watched() and triton_enabled(x, KERNELS)
            and (device.type != "cuda" or (_has_tf32_cores(device.index or 0) and device.index not in _NO_ROOM)))


# torch.bmm / torch.mm with out_dtype (CUDA, 16-bit inputs into fp32: the tensor cores' fp32 accumulator written out
# unrounded), where this torch has it (2.8 and later)
_MATMUL_OUT_DTYPE = "dtype" in torch.ops.aten.bmm.overloads() and "dtype" in torch.ops.aten.mm.overloads()


def matmul_fp32_out(a: Tensor, b: Tensor) -> Tensor:
    """a @ b in fp32 from 16-bit a, b (2-D: mm, 3-D: bmm): the products accumulated in fp32 and never rounded to 16
    bits, as the weight gradients of autocast training want them. On CUDA one matmul with out_dtype; elsewhere (or
    on an older torch) the same in fp32 from the inputs converted (exact: 16-bit values are fp32 values)."""
    if a.is_cuda and _MATMUL_OUT_DTYPE:
        return (torch.bmm if a.dim() == 3 else torch.mm)(a, b, out_dtype=torch.float32)
    return torch.matmul(a.float(), b.float())


class LiveRows:
    """Which token rows of a (batch, L, ...) activation the mixers' Linear layers must compute: image b's first
    lengths[b] + margin (DyVM training: its kept and class tokens, then `margin` more, as far as the mixer's conv
    reaches past them). One per pruning stage, shared by its layers: the row map is built on the device at first
    use (a few small ops, no host sync, fixed shapes for CUDA graphs) and kept per (L, margin)."""

    def __init__(self, lengths: Tensor):
        self.lengths = lengths
        self._maps = {}

    def row_map(self, seqlen: int, margin: int):
        """-> (rows (batch * L,) int32: the token rows b * L + t, live ones first in order, then the others;
        live (1,) int32: how many are live), as mamba_ssm.ops.triton.linear_tf32x3 takes them."""
        key = (seqlen, margin)
        if key not in self._maps:
            self._maps[key] = live_row_map(self.lengths, seqlen, margin)
        return self._maps[key]


def live_row_map(lengths: Tensor, seqlen: int, margin: int):
    """LiveRows.row_map for per-image lengths (batch,) int."""
    positions = torch.arange(seqlen, device=lengths.device)
    live = (positions < (lengths.long() + margin)[:, None]).flatten()
    count = live.sum().reshape(1)
    slot = torch.where(live, live.long().cumsum(0) - 1, count + (~live).long().cumsum(0) - 1)
    rows = torch.empty(live.shape, dtype=torch.int32, device=lengths.device)
    rows.scatter_(0, slot, torch.arange(live.numel(), dtype=torch.int32, device=lengths.device))
    return rows, count.to(torch.int32)


def module_hooked(*modules: nn.Module) -> bool:
    """Whether a hook must see these modules' calls (their own hooks or global ones): then they run themselves."""
    if _nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks:
        return True
    for m in modules:  # (a loop, not any() over a generator: this runs per call of eager inference)
        if m._forward_hooks or m._forward_pre_hooks:
            return True
    return False


def linear_module(module: nn.Module, x: Tensor, cached: Optional[tuple] = None,
                  live_rows: Optional["LiveRows"] = None, margin: int = 0) -> Tensor:
    """A Linear module applied to x, fp32 on the kernel where tf32x3_applies (the mixers' Linears, DyVM's score
    predictors), autocast's 16-bit product with fp32 weight gradients in autocast training (_AutocastLinear).
    cached: (weight, bias, memo), inference's cached weights of the module, when the caller has them;
    live_rows: compute only each image's first lengths + margin rows (see LiveRows; not with cached weights). The
    module runs itself where a hook must see its call, where it is not a plain nn.Linear (a replaced module runs
    its own forward), and where the kernel does not apply."""
    if type(module) is not nn.Linear or module_hooked(module):
        return module(x)
    if cached is not None:
        return linear(x, *cached)
    if tf32x3_applies(x, module.weight):
        row_map = None if live_rows is None else live_rows.row_map(x.shape[1], margin)
        return linear_on_kernel(x, module.weight, module.bias, row_map)
    dtype = _autocast_training_dtype(x, module.weight, module.bias)
    if dtype is not None:
        return _AutocastLinear.apply(x, module.weight, module.bias, dtype)
    return module(x)


def _autocast_training_dtype(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Optional[torch.dtype]:
    """The 16-bit autocast dtype where _AutocastLinear takes a Linear's training call (autocast on for x's device,
    a gradient wanted, fp32 or that dtype throughout, nothing watching the ops), else None."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    usable = (dtype, torch.float32)
    if (dtype not in (torch.bfloat16, torch.float16) or x.dtype not in usable or weight.dtype not in usable
            or (bias is not None and bias.dtype not in usable) or not needs_grad(x, weight, bias) or ops_watched()):
        return None
    return dtype


class _AutocastLinear(torch.autograd.Function):
    """F.linear as autocast runs it (input, weight and bias cast to the 16-bit `dtype`, a 16-bit product), with the
    weight's gradient summed in fp32 into an fp32 weight (matmul_fp32_out: no 16-bit rounding, and no cast of a
    16-bit gradient after it, one launch a layer and Linear fewer) and the bias's summed in fp32. The input's
    gradient is autocast's: the 16-bit product, in the input's dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        x_in, weight_in = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(x_in, weight_in)
        ctx.wide = (weight.dtype == torch.float32, bias is not None and bias.dtype == torch.float32)
        return F.linear(x_in, weight_in, None if bias is None else bias.to(dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x_in, weight_in = ctx.saved_tensors
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            dx = dout.matmul(weight_in)
        rows = dout.reshape(-1, dout.shape[-1])
        if ctx.needs_input_grad[1]:
            x_rows = x_in.reshape(-1, x_in.shape[-1])
            dweight = matmul_fp32_out(rows.t(), x_rows) if ctx.wide[0] else rows.t().mm(x_rows)
        if ctx.needs_input_grad[2]:
            dbias = rows.sum(0, dtype=torch.float32 if ctx.wide[1] else rows.dtype)
        return dx, dweight, dbias, None


def linear(x: Tensor, weight: Tensor, bias=None, memo: Optional[dict] = None) -> Tensor:
    """F.linear(x, weight, bias), fp32 on TF32 tensor cores where tf32x3_applies. memo: a dict that lives as long
    as the weight's values (inference's cached weights), where the weight's split is kept after its first use."""
    if not tf32x3_applies(x, weight):
        return F.linear(x, weight, bias)
    if memo is not None and not needs_grad(x, weight, bias) and eager_replays_apply(x):
        # eager inference with cached weights: the kernel's launches replayed (causal_conv1d.launch_replay; the
        # plans live in the memo, with the weight's split)
        key = ("linear replay", x.shape, x.stride(), x.dtype, x.device, x.data_ptr() & 15, id(weight),
               None if bias is None else id(bias))
        return replayed(memo, key, lambda: linear_on_kernel(x, weight, bias, memo=memo), (x,), (weight, bias, memo))
    return linear_on_kernel(x, weight, bias, memo=memo)


def linear_on_kernel(x: Tensor, weight: Tensor, bias=None, row_map: Optional[tuple] = None,
                     memo: Optional[dict] = None) -> Tensor:
    """linear() for a caller that has checked tf32x3_applies itself (linear_module, which runs the Linear module
    where the kernel does not apply): the kernel, with autograd when a gradient is wanted. row_map: None, or
    LiveRows.row_map(...) to compute the live rows only (zeros elsewhere); memo: see linear (no gradient only).
    A stack (x (R, batch, L, K), weights (R, N, K) contiguous -> (R, batch, L, N)): no gradient (x_proj's forward)."""
    kernels = _kernels()
    try:
        if needs_grad(x, weight, bias):
            return _LinearTF32x3.apply(x, weight, bias, row_map)
        return kernels.linear_tf32x3(x, *weight_parts(weight, memo), bias, live_rows=row_map)
    except kernels.OutOfResources as e:  # the kernel's tiles do not fit this GPU's shared memory: cuBLAS from now on
        _NO_ROOM.add(x.device.index)
        warnings.warn(f"fp32 in_proj / out_proj / x_proj / predictors stay on cuBLAS on this GPU (the tf32x3 "
                      f"kernel: {e})", stacklevel=2)
        if weight.dim() == 3:  # (a stack)
            return torch.matmul(x, weight.transpose(1, 2).unsqueeze(1))
        return F.linear(x, weight, bias)


def weight_parts(weight: Tensor, memo: Optional[dict], key: str = "tf32") -> tuple:
    """split_tf32(weight), from memo[key] when it holds them (and kept there when memo is given: one key per
    weight that the memo's owner splits; not from inside a CUDA-graph capture, whose tensors hold values only
    once the graph replays: a module with constant weights takes its memo into captures)."""
    return kept_in(memo, key, lambda: _kernels().split_tf32(weight), weight)


@lru_cache(maxsize=None)
def _kernels():
    """The kernel module (linear_tf32x3, split_tf32, Triton's OutOfResources), imported at the first call: machines
    without Triton never get here, and an import statement per call is a microsecond of host time per Linear."""
    from mamba_ssm.ops.triton import linear_tf32x3

    return linear_tf32x3


class _LinearTF32x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, row_map):
        kernels = _kernels()
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.row_map = bias is not None, row_map
        return kernels.linear_tf32x3(x, *kernels.split_tf32(weight), bias, live_rows=row_map)

    @staticmethod
    @once_differentiable  # (a second derivative through it raises instead of coming out wrong)
    def backward(ctx, dout):
        kernels = _kernels()
        x, weight = ctx.saved_tensors
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:  # (zeros at the dead rows: nobody reads them)
            dx = kernels.linear_tf32x3(dout, *kernels.split_tf32(weight.t()), live_rows=ctx.row_map)
        if ctx.needs_input_grad[1]:  # (every row; dead ones add 0: out_proj's input, in_proj's dout are 0)
            dweight = dout.reshape(-1, dout.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dout.sum((0, 1))
        return dx, dweight, dbias, None
