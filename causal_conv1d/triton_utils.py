"""Triton device helpers shared by the kernels of both packages (triton_causal_conv1d.py and mamba_ssm's
ops/triton/*.py), and their launches. A leaf: imports Triton and nothing of either package."""
import functools
import inspect
import itertools
import operator
import os
from contextlib import contextmanager

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime.jit import JITFunction


@triton.jit
def pick4(v0, v1, v2, v3, j: tl.constexpr):
    """v_j for a compile-time j (selecting among values loaded ahead of use)."""
    v = v0
    if j == 1:
        v = v1
    if j == 2:
        v = v2
    if j == 3:
        v = v3
    return v


@triton.jit
def tf32_round(x):
    """x rounded to the nearest TF32 value (10 mantissa bits; ties away from zero), as fp32: its low 13 bits
    rounded into the rest through the integer add, then cleared. x = tf32_round(x) + tf32_round(the rest) to about
    2^-22 of x, both parts exact TF32 values: the split of the three-product fp32 matmuls (mamba_ssm's
    linear_tf32x3 and gated_proj kernels)."""
    return ((x.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def dot_tf32x3(a_hi, a_lo, b_hi, b_lo, acc):
    """acc + a @ b for fp32 a = a_hi + a_lo, b = b_hi + b_lo (tf32_round's parts) as three TF32 tensor-core
    products (the dropped a_lo b_lo is about 2^-22 of each product). Exact TF32 values, so each product is exact;
    the small terms first, into a fresh accumulator added to acc by an fp32 add. The tensor cores add into their
    accumulator without rounding to nearest (the addends' low bits are cut where the sum's exponent is larger), so
    a long sum in one accumulator drifts: 2.6e-6 to 1.1e-5 from fp64 at Vim-S shapes; a fresh one per 32-deep step,
    as Triton's own tf32x3 does, gives 1.5e-7."""
    step = tl.dot(a_lo, b_hi, tl.zeros(acc.shape, dtype=tl.float32), input_precision="tf32")
    step = tl.dot(a_hi, b_lo, step, input_precision="tf32")
    return acc + tl.dot(a_hi, b_hi, step, input_precision="tf32")


# Host-side launch arithmetic in plain integers: triton.cdiv / triton.next_power_of_2 are constexpr functions
# whose host calls cost a microsecond or more each, several times per layer of every eager forward.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.lru_cache(maxsize=None)
def row_blocks(n_cols: int) -> tuple:
    """(rows, columns) per program for kernels that hold whole rows of n_cols in registers (the norms, the pruning
    stage): columns padded to a power of two, up to 16 rows and 4096 elements per program."""
    block_n = next_pow2(n_cols)
    return max(1, min(16, 4096 // block_n)), block_n


# ---- Kernel launches with less host work ------------------------------------------------------------------
# `kernel[grid](*args, **kwargs)` costs about 45 us of host time per launch on the H200 machines (Triton's
# binder specialises every argument, builds the cache key, checks globals, then calls the C launcher), and eager
# inference is bound by the host: some 100 launches per Vim-S forward. `launch` keeps, per kernel, the compiled
# kernel of every argument key it has launched and calls its launcher directly. The key holds everything
# Triton specialises on, and more: the arguments' types, the exact values of the scalars (ints, floats, bools,
# None, strings), each tensor's dtype and pointer address modulo 16, the keyword arguments (constexprs and
# launch options). It is built from C-level maps and getters (a few microseconds for 50 arguments); equal keys
# mean an equal specialisation. A key not seen yet goes through Triton (which compiles or finds the kernel) and
# is remembered. Anything unusual takes Triton's own path: the interpreter, launch hooks (Triton's
# profilers), a kernel's pre-run hooks, an argument of another type, no GPU driver, MAMBA_TRITON_FAST_LAUNCH=0.
FAST_LAUNCH_ENV = "MAMBA_TRITON_FAST_LAUNCH"
_fast_launch = os.environ.get(FAST_LAUNCH_ENV, "1") not in ("", "0")
_SCALAR_TYPES = (int, float, bool, str, type(None))
MAX_KEYS = 4096  # per kernel
_data_ptr, _dtype, _and = torch.Tensor.data_ptr, operator.attrgetter("dtype"), operator.and_
_FIFTEEN = itertools.repeat(15)  # (map stops at its shortest input)


def remember(cache: dict, key, value, limit: int = 4096):
    """cache[key] = value, emptying the cache first when it holds `limit` entries (a run over many shapes starts
    afresh instead of growing without bound); returns value. For the launch keys and the launch plans."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value
    return value


class Unkeyable(TypeError):
    """An argument of a type the launch key does not know."""


def _getter(positions):
    """args -> the tuple of args at `positions` (operator.itemgetter returns a bare item for one position)."""
    if len(positions) > 1:
        return operator.itemgetter(*positions)
    return (lambda args: (args[positions[0]],)) if positions else (lambda args: ())


def _split_by_type(types: tuple):
    """(getter of the tensor arguments, getter of the scalar arguments) for a tuple of argument types."""
    tensors = [i for i, t in enumerate(types) if issubclass(t, torch.Tensor)]
    scalars = [i for i, t in enumerate(types) if t in _SCALAR_TYPES]
    if len(tensors) + len(scalars) != len(types):
        bad = next(t for t in types if t not in _SCALAR_TYPES and not issubclass(t, torch.Tensor))
        raise Unkeyable(f"no launch key for an argument of type {bad.__name__}")
    return _getter(tensors), _getter(scalars)


def specialization_key(args: tuple, kwargs: dict, splits: dict) -> tuple:
    """The launch key of these arguments (see above); splits: a dict that memoises _split_by_type."""
    types = tuple(map(type, args))
    split = splits.get(types)
    if split is None:
        split = splits[types] = _split_by_type(types)
    tensors = split[0](args)
    return (types, split[1](args), tuple(map(_dtype, tensors)), tuple(map(_and, map(_data_ptr, tensors), _FIFTEEN)),
            tuple(kwargs.items()))


class FastLauncher:
    """Direct launches of one JIT kernel's compiled specialisations (see above). device / stream: the current
    device index and the raw stream for a device (default: what Triton's own launch path asks its driver)."""

    def __init__(self, kernel, device=None, stream=None):
        self.kernel = kernel
        self.names = list(kernel.arg_names)
        self.defaults = {p.name: p.default for p in kernel.signature.parameters.values()
                         if p.default is not inspect.Parameter.empty}
        if device is None or stream is None:
            from triton.runtime.driver import driver
            device, stream = driver.active.get_current_device, driver.active.get_current_stream
        self.device, self.stream = device, stream
        self.compiled, self.splits = {}, {}

    def __call__(self, grid, args, kwargs):
        try:
            key = specialization_key(args, kwargs, self.splits), self.device()
            entry = self.compiled.get(key)
        except (Unkeyable, TypeError):  # (TypeError: an unhashable keyword value)
            return self.kernel[grid](*args, **kwargs)
        if entry is None:  # Triton's path, which compiles or finds the kernel; remember what it launched
            compiled = self.kernel[grid](*args, **kwargs)
            if all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")) and \
                    not any(isinstance(v, torch.Tensor) for v in kwargs.values()):  # (keyed by identity)
                # the parameters after the positional ones, in the kernel's order (constexprs included: the
                # launcher skips them, as in Triton's run), fixed by the key
                tail = tuple(kwargs[n] if n in kwargs else self.defaults[n] for n in self.names[len(args):])
                remember(self.compiled, key, (compiled, tail), MAX_KEYS)
            return compiled
        compiled, tail = entry
        g = (*grid, 1, 1)
        compiled.run(g[0], g[1], g[2], self.stream(key[1]), compiled.function, compiled.packed_metadata,
                     None, None, None, *args, *tail)
        return compiled


_launchers = {}


def interpreted(kernel) -> bool:
    """Whether `kernel` runs in Triton's interpreter (TRITON_INTERPRET=1: the kernel is no JITFunction)."""
    return not isinstance(kernel, JITFunction)


def launch(kernel, grid, *args, **kwargs):
    """`kernel[grid](*args, **kwargs)`, with less host work for specialisations launched before (see above)."""
    # (interpreted kernels are not JITFunctions; pre-run hooks are Triton's to call)
    if _fast_launch and isinstance(kernel, JITFunction) and not launch_hooks_set() and \
            not getattr(kernel, "pre_run_hooks", None):
        fast = _launchers.get(kernel)
        if fast is None:
            try:
                fast = FastLauncher(kernel)
            except RuntimeError:  # no GPU driver (Triton's own path then says what is missing)
                fast = False
            _launchers[kernel] = fast
        if fast:
            return fast(grid, args, kwargs)
    return kernel[grid](*args, **kwargs)


@contextmanager
def fast_launches(enabled: bool):
    """Within the block, launches take the direct path (True) or Triton's own (False): for A/B checks."""
    global _fast_launch
    previous, _fast_launch = _fast_launch, enabled
    try:
        yield
    finally:
        _fast_launch = previous


def launch_hooks_set() -> bool:
    """Launch hooks set (Triton's profilers): they need Triton's own launch path."""
    runtime = knobs.runtime
    # (None when unset up to Triton 3.6; later versions hold an empty HookChain)
    return any(h is not None and bool(getattr(h, "calls", True))
               for h in (runtime.launch_enter_hook, runtime.launch_exit_hook))
