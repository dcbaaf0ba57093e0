"""A training step captured in a CUDA graph and replayed: forward, loss, backward, gradient clipping and the
optimizer step launched at once, so the GPU, not the host, sets the pace.

Why: an eager DyVM fine-tuning step launches thousands of small kernels (24 layers of gates and masks, three
pruning stages, their autograd, the loss terms, the teacher): measured on an H200 at batch 128 in bf16, the
GPU is busy 137 ms of a 230 ms step (docs/results.md). A replay costs the host a few microseconds.

What makes it possible: every shape in a training step is fixed (the training forward keeps the full sequence
and masks pruned tokens; train loaders drop the last partial batch), and nothing waits on the host. What it
needs, checked at construction with one-line errors: a CUDA device, no fp16 GradScaler, and an Adam/AdamW
optimizer made with fused=True, capturable=True (their update is captured, reads its learning rate from the
device, and skips the update on the device when the loss is not finite).

Under DDP (torchrun) the gradients' all-reduces are captured too (NCCL collectives are capturable), so each
process's host no longer sets the pace of its GPU. As torch's CUDA-graph notes require, the DDP module is built
on the stream that later warms up and captures (`distributed_for_graphs`), and at least 11 DDP steps run eagerly
before the capture (DDP settles its gradient buckets in the first steps). A non-finite loss on any process skips
the update on every process (the skip flag is all-reduced in the graph), and every process raises.

Semantics kept from the eager step:
- a non-finite loss stops training: its update is skipped on the device (the fused optimizer's found_inf),
  and so is every later step's until `clear_nonfinite()`; the caller raises as the eager step does, so the
  weights never see it. train_one_epoch reads each step's flag after it has launched the next step (waiting
  for the step to finish first would idle the GPU while the host works), and raises naming the first bad step;
  that step's EMA update has then run on the unchanged weights, in memory only (training stops, and nothing is
  saved after it);
- learning-rate schedules work: the rate lives in a device tensor that each call refreshes from the param
  group (timm's schedulers keep writing floats there);
- random decisions (Gumbel noise, drop path) differ per step: the graph advances the CUDA generator;
- mixup and the EMA update stay outside the graph (mixup draws its box on the host).
The first `warmup` calls run eager steps on a side stream (kernel compilation, lazy state, allocator), the next
call captures and replays; each call is exactly one training step. A batch of another shape runs eagerly.
"""
from contextlib import nullcontext
from typing import NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from dyvm.engine import start_teacher

DDP_WARMUP = 11  # eager DDP steps before a capture (torch's CUDA-graph notes)


class StepResult(NamedTuple):
    """What one step produced. The tensors are overwritten by the next replay: read them before the next call."""
    loss: Tensor
    parts: dict
    out: object  # the model's ForwardOutput
    finite: Tensor  # bool, device: False when this step's loss, or an earlier one's, was not finite (no update)


def graph_step_problem(device: torch.device, optimizer, scaler) -> Optional[str]:
    """Why a graphed training step cannot run here (one line), or None."""
    if device.type != "cuda":
        return "a CUDA-graph training step needs a CUDA device"
    if scaler is not None:
        return "a CUDA-graph training step does not support the fp16 GradScaler: use bf16 or fp32"
    groups = optimizer.param_groups
    if not isinstance(optimizer, torch.optim.Adam) or not all(g.get("fused") and g.get("capturable")
                                                              for g in groups):
        return "a CUDA-graph training step needs torch's Adam/AdamW made with fused=True, capturable=True"
    return None


def distributed_for_graphs(module: nn.Module, device: torch.device,
                           **ddp_kwargs) -> Tuple[DistributedDataParallel, torch.cuda.Stream]:
    """DistributedDataParallel(module) built on a new side stream, and that stream: give both to
    GraphedTrainStep (a DDP module whose gradient hooks belong to another stream cannot be captured)."""
    stream = torch.cuda.Stream(device=device)
    with torch.cuda.stream(stream):
        return DistributedDataParallel(module, device_ids=[device.index], **ddp_kwargs), stream


class GraphedTrainStep:
    """Calls run one training step each (see the module docstring). model: the module whose call returns the
    ForwardOutput (engine.AuxForward), or its DDP wrapper from distributed_for_graphs together with that
    function's stream; criterion(images, out, targets) -> (loss, parts)."""

    def __init__(self, model: nn.Module, criterion: nn.Module, optimizer, amp_dtype: Optional[torch.dtype] = None,
                 clip_grad: Optional[float] = None, warmup: int = 2, stream: Optional[torch.cuda.Stream] = None):
        self.distributed = isinstance(model, DistributedDataParallel)
        if self.distributed and stream is None:
            raise ValueError("a graphed DDP step needs the stream its DDP module was built on "
                             "(dyvm.train_graph.distributed_for_graphs)")
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.amp_dtype, self.clip_grad = amp_dtype, clip_grad
        self.warmup = max(warmup, DDP_WARMUP) if self.distributed else warmup
        self.steps = 0
        self.graph = None
        self._static = None  # (images, targets, StepResult) of the captured step
        self._lr = None  # per param group: the device tensor the captured update reads its rate from
        device = next(model.parameters()).device
        self._found_inf = torch.zeros((), device=device)  # the shape the fused optimizer expects
        self._side = stream or torch.cuda.Stream(device=device)  # warm-up and capture stream

    def clear_nonfinite(self) -> None:
        """Let updates run again after a non-finite step (each step skips its update from the first non-finite one
        on; see the module docstring)."""
        self._found_inf.zero_()

    def _autocast(self, cache_enabled: bool):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype, cache_enabled=cache_enabled)

    def _forward_backward(self, images: Tensor, targets: Tensor, cache_enabled: bool) -> StepResult:
        with self._autocast(cache_enabled):
            start_teacher(self.criterion, images)  # its forward beside the student's (a branch of the graph)
            out = self.model(images)
            loss, parts = self.criterion(images, out, targets)
        # the fused update skips itself while this is 1; it stays 1 after a non-finite loss (the training loop
        # reads it a step late, when the next step has already run: that one must not update either)
        torch.maximum(self._found_inf, (~torch.isfinite(loss.detach())).float(), out=self._found_inf)
        if self.distributed:  # the all-reduced gradients are not finite either: every process skips and raises
            dist.all_reduce(self._found_inf, op=dist.ReduceOp.MAX)
        finite = self._found_inf == 0
        loss.backward()
        if self.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.optimizer.step()
        return StepResult(loss.detach(), parts, out, finite)

    def _eager(self, images: Tensor, targets: Tensor) -> StepResult:
        # gradients may be the graph's buffers: zero them in place so the eager backward does not add to them
        self.optimizer.zero_grad(set_to_none=self.graph is None)
        self._side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side):
            result = self._forward_backward(images, targets, cache_enabled=True)
        torch.cuda.current_stream().wait_stream(self._side)
        return result

    def _capture(self, images: Tensor, targets: Tensor) -> None:
        self._lr = []
        for group in self.optimizer.param_groups:  # the captured update reads its rate from here
            lr = torch.tensor(float(group["lr"]), device=images.device)
            self._lr.append(lr)
            group["lr"] = lr
        static_images, static_targets = images.clone(), targets.clone()
        self.optimizer.zero_grad(set_to_none=True)  # the backward captures fresh gradient buffers
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self._side):
                result = self._forward_backward(static_images, static_targets, cache_enabled=False)
        finally:
            for group, lr in zip(self.optimizer.param_groups, self._lr):
                group["lr"] = float(lr)  # schedulers and logs keep seeing floats
        self.graph, self._static = graph, (static_images, static_targets, result)

    def __call__(self, images: Tensor, targets: Tensor) -> StepResult:
        self.optimizer.found_inf = self._found_inf
        self.steps += 1
        if self.steps <= self.warmup or (self._static is not None and (
                images.shape != self._static[0].shape or targets.shape != self._static[1].shape)):
            return self._eager(images, targets)
        if self.graph is None:
            self._capture(images, targets)
        static_images, static_targets, result = self._static
        static_images.copy_(images)
        static_targets.copy_(targets)
        for group, lr in zip(self.optimizer.param_groups, self._lr):
            lr.fill_(float(group["lr"]))
        self.graph.replay()
        return result
