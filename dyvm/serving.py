"""Inference through captured CUDA graphs: the model's forward recorded once per input shape and replayed.

    from dyvm.serving import graphed
    fast = graphed(model, dtype=torch.bfloat16)   # one line; the model is put in eval mode
    logits = fast(images)                          # the first call per (shape, dtype) captures, later calls replay

Why: an eager forward launches some 300 (dense Vim) to 600 (DyVM) kernels, and at batch 128 in bf16 the host's
Python and launch work takes longer than the GPU's (docs/results.md). A replay launches the whole forward at
once, so the GPU sets the pace. It is possible because nothing in a Vim or DyVM forward waits on the host: token
pruning keeps a fixed count (top-k and gathers on the device) and a gated-off scan direction is skipped inside the
kernels, which read the gates on the device.

Rules of the cache:
- one graph per (input shape, input dtype, device, autocast dtype), at most `max_graphs` of them (least recently
  used evicted, its memory freed): a last, smaller batch of an evaluation gets its own graph;
- outputs live in the graph's memory and are overwritten by the next call of the same shape: clone them to keep
  them (`copy_outputs=True` does it for every call);
- the weights a forward derives from the parameters (each layer's stacked scan weights, A = -exp(A_log), the 16-bit
  casts under autocast, the fp32 kernels' TF32 parts) are derived by the eager calls before a capture and read by
  the graph, not derived again at every replay (about 0.6 ms of a DyVM-S fp32 forward's 19 ms); a parameter
  changed in place (an optimizer step, load_state_dict: its version counter moves) or moved (.to(), .cuda()) is
  detected at the next call and the graphs are captured again; after replacing a sub-module, call `reset()`
  (a change through `.data`, which bypasses the version counter, is not seen: eager inference's weight cache
  relies on the counter too);
- inputs that are not CUDA tensors, or a machine without CUDA, run the plain forward (no_grad, autocast if asked):
  the same call works everywhere.
"""
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import fields, is_dataclass, replace
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.nn as nn
from torch import Tensor

from mamba_ssm.modules.mamba_simple import inference_caches, tensors_state, weights_constant_while


def map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply fn to every tensor of a nested output (tensors, lists, tuples, dicts, dataclasses)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        mapped = [map_tensors(o, fn) for o in obj]
        return type(obj)(*mapped) if hasattr(obj, "_fields") else type(obj)(mapped)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if is_dataclass(obj) and not isinstance(obj, type):
        return replace(obj, **{f.name: map_tensors(getattr(obj, f.name), fn) for f in fields(obj)})
    return obj


def autocast_context(device_type: str, dtype: Optional[torch.dtype], cache_enabled: bool = True):
    """torch.autocast for dtype (bf16 / fp16), or nothing for None (fp32)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type, dtype=dtype, cache_enabled=cache_enabled)


class _Graph(NamedTuple):
    graph: "torch.cuda.CUDAGraph"
    static_input: Tensor
    static_output: Any
    derived: list  # the derived weights the graph reads (inference_caches), kept alive while it is


class GraphedModule:
    """Replays CUDA graphs of `getattr(model, method)(x)` for inference (see the module docstring).

    dtype: autocast dtype (torch.bfloat16 / torch.float16), None for fp32, or "auto" to follow the autocast
    state around each call (a graph per state: how a training loop's criterion runs its frozen teacher).
    warmup: eager calls before a capture (they compile the Triton kernels and settle the allocator; they run on
    a side stream, as capture requires).
    """

    def __init__(self, model: nn.Module, method: str = "forward", dtype: Optional[torch.dtype] = None,
                 max_graphs: int = 4, copy_outputs: bool = False, warmup: int = 2):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        if not callable(getattr(model, method, None)):
            raise ValueError(f"{type(model).__name__} has no method {method!r}")
        self.model, self.method, self.dtype = model, method, dtype
        self.max_graphs, self.copy_outputs, self.warmup = max_graphs, copy_outputs, warmup
        self._graphs: "OrderedDict[tuple, _Graph]" = OrderedDict()
        self._tensors: list = []  # parameters and buffers the graphs were captured from
        self._where: tuple = ()  # their state then (addresses, version counters, dtypes)
        self.captures = 0  # graphs captured so far (tests and logs)

    def _fn(self, x: Tensor):
        return getattr(self.model, self.method)(x)

    def _dtype(self, x: Tensor) -> Optional[torch.dtype]:
        if self.dtype != "auto":
            return self.dtype
        device = x.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None

    def eager(self, x: Tensor):
        """The plain call, as a replay computes it: no_grad, autocast if a dtype was given."""
        with torch.no_grad(), autocast_context(x.device.type, self._dtype(x)):
            return self._fn(x)

    def reset(self) -> None:
        """Drop every graph (and the memory it holds); the next call captures again."""
        self._graphs.clear()
        self._tensors, self._where = [], ()

    def _state(self) -> tuple:
        return tensors_state(self._tensors)

    def _capture(self, x: Tensor, dtype: Optional[torch.dtype]) -> _Graph:
        static_input = x.clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        # the autocast weight cache cannot outlive a capture: off during warm-up and capture alike
        # the warm-up calls derive and keep the weights (eager inference's caches), the capture reads them
        with weights_constant_while(self.model):
            with torch.cuda.stream(side), torch.no_grad(), autocast_context("cuda", dtype, cache_enabled=False):
                for _ in range(self.warmup):
                    self._fn(static_input)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.no_grad(), autocast_context("cuda", dtype, cache_enabled=False):
                static_output = self._fn(static_input)
        self.captures += 1
        return _Graph(graph, static_input, static_output, inference_caches(self.model))

    def __call__(self, x: Tensor):
        if not x.is_cuda:
            return self.eager(x)
        if self.model.training:
            raise ValueError("CUDA graphs here serve inference: call model.eval() first")
        if torch.cuda.is_current_stream_capturing():  # inside the capture of another graph: becomes part of it
            return self.eager(x)
        if not self._graphs or self._state() != self._where:
            self.reset()
            self._tensors = list(self.model.parameters()) + list(self.model.buffers())
            self._where = self._state()
        dtype = self._dtype(x)
        key = (tuple(x.shape), x.dtype, x.device, dtype)
        entry = self._graphs.get(key)
        if entry is None:
            while len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)  # least recently used; its memory pool goes with it
            entry = self._graphs[key] = self._capture(x, dtype)
        else:
            self._graphs.move_to_end(key)
        entry.static_input.copy_(x)
        entry.graph.replay()
        out = entry.static_output
        return map_tensors(out, torch.clone) if self.copy_outputs else out


def graphed(model: nn.Module, dtype: Optional[torch.dtype] = None, method: str = "forward", max_graphs: int = 4,
            copy_outputs: bool = False) -> GraphedModule:
    """`model` served through CUDA graphs: call the result like the model (see the module docstring).

    method="forward_aux" serves the full DyVM output (logits, kept tokens, gates): what --eval uses."""
    model.eval()
    return GraphedModule(model, method=method, dtype=dtype, max_graphs=max_graphs, copy_outputs=copy_outputs)
