"""Utilities shared by the kernels and the op layers of both packages (causal_conv1d and mamba_ssm, which
imports this one): which implementation a call takes, whether something watches it, and the tuning-file
loader of the Triton kernels. A leaf: plain Python and torch, importable without Triton (the Triton device
helpers shared by the kernels live in causal_conv1d/triton_utils.py).

Implementations: the Triton kernels for CUDA tensors (and for CPU tensors inside triton_on_cpu(), which the
tests use with TRITON_INTERPRET=1), the PyTorch implementations otherwise; MAMBA_FORCE_REFERENCE=1 sends
every call to the plain references instead (to rule an implementation out when debugging).
"""
import importlib
import json
import os
from contextlib import contextmanager
from functools import lru_cache
from typing import Callable, Optional

import torch

FORCE_REFERENCE_ENV = "MAMBA_FORCE_REFERENCE"
_triton_on_cpu = False


# reference_forced() runs for every op call (some 180 per eager DyVM-S forward), and os.environ.get costs about
# 2 us of host time there (key encoding, Mapping.get, value decoding), a few percent of a forward that the host
# paces. The variable may be set or cleared at any time (tests, gpu_check, benchmarks/cpu_step.py), so it is read
# every call, but from the mapping's own store: one dict lookup of the pre-encoded key. Where os.environ has no
# such store (another Python) or was replaced, the plain lookup.
_ENVIRON = os.environ
_ENV_STORE = getattr(os.environ, "_data", None)
try:
    _FORCE_KEY = os.environ.encodekey(FORCE_REFERENCE_ENV)
    _OFF_VALUES = frozenset(os.environ.encodevalue(v) for v in ("", "0"))
except AttributeError:
    _ENV_STORE = None


def reference_forced() -> bool:
    if os.environ is _ENVIRON and _ENV_STORE is not None:
        value = _ENV_STORE.get(_FORCE_KEY)
        return value is not None and value not in _OFF_VALUES
    return os.environ.get(FORCE_REFERENCE_ENV, "0") not in ("", "0")


@contextmanager
def triton_on_cpu():
    """Send CPU tensors to the Triton kernels (only meaningful with TRITON_INTERPRET=1; for tests)."""
    global _triton_on_cpu
    previous, _triton_on_cpu = _triton_on_cpu, True
    try:
        yield
    finally:
        _triton_on_cpu = previous


@lru_cache(maxsize=None)
def module_importable(module: str) -> bool:
    """True when the (kernel) module of this dotted name imports, i.e. Triton is installed."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def triton_enabled(x: torch.Tensor, module: str) -> bool:
    """True when tensor `x` should take the Triton kernels of the dotted module `module`."""
    if reference_forced() or not (x.is_cuda or _triton_on_cpu):
        return False
    return module_importable(module)


_dispatch_stack_len = torch._C._len_torch_dispatch_stack  # (user and infra modes, as torch counts them)


def ops_watched() -> bool:
    """Whether something watches ops, so that calls must go through our torch.library custom ops:
    torch.compile tracing, or a dispatch mode (FlopCounterMode, FakeTensorMode). Otherwise (eager) the
    ops' implementations run directly, under a torch.autograd.Function when a gradient is needed: the same
    computation without the custom-op dispatcher's overhead (0.1 to 0.2 ms per call on an H200 host,
    cProfile of an eager Vim-S forward), which bounds eager inference and small-batch training. (The mode stack's
    length from C: torch's _get_current_dispatch_mode() is not None, without its Python; asked five times a layer.)"""
    return torch.compiler.is_compiling() or _dispatch_stack_len() > 0


# torch.backends.cuda.matmul.allow_tf32's value without its Python __getattr__ (asked at every fp32 Linear and
# projections call of eager inference)
tf32_matmuls_allowed = getattr(torch._C, "_get_cublas_allow_tf32", None) or (
    lambda: torch.backends.cuda.matmul.allow_tf32)


def graph_capturing(x: torch.Tensor) -> bool:
    """Whether x's device is capturing a CUDA graph on the current stream (work queued now runs at each replay)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def kept_in(memo: Optional[dict], key, derive: Callable, like: torch.Tensor):
    """memo[key], derived by derive() at its first use and kept there (memo None: derived at each call). Inference's
    cached weights carry such a memo for what the kernels derive from them. Nothing is kept from inside a CUDA-graph
    capture on like's device, whose tensors hold values only once the graph replays (a module with constant
    weights takes the memo an eager call filled into its captures)."""
    value = None if memo is None else memo.get(key)
    if value is None:
        value = derive()
        if memo is not None and not graph_capturing(like):
            memo[key] = value
    return value


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def apply_tuning_file(section: str, table: dict) -> None:
    """Launch-parameter overrides of the Triton kernels: MAMBA_TRITON_TUNING=file.json (written by
    benchmarks/kernels.py --sweep --save-tuning) replaces entries of the built-in table `table` in place
    from the file's `section` ("fwd", "bwd" or "conv"); a bad file or entry is a clear error naming the
    variable, the file and the entry."""
    path = os.environ.get("MAMBA_TRITON_TUNING")
    if not path:
        return
    try:
        saved = json.load(open(path)).get(section, {})
    except (OSError, ValueError) as e:
        raise RuntimeError(f"MAMBA_TRITON_TUNING={path}: cannot read the tuning file ({e})") from None
    for key, cfg in saved.items():  # entries may omit parameters added later (they keep the built-in value)
        if key not in table or not set(cfg) <= set(table[key]):
            raise RuntimeError(f"MAMBA_TRITON_TUNING={path}: unexpected {section} entry {key}: {cfg}")
        table[key] = {**table[key], **cfg}
