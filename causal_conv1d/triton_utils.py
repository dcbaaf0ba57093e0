"""Triton device helpers shared by the kernels of both packages (triton_causal_conv1d.py and mamba_ssm's
ops/triton/*.py), and their launches. A leaf: imports Triton and nothing of either package."""
import functools
import inspect
import itertools
import operator
import os
import threading
from contextlib import contextmanager
from typing import Callable, NamedTuple

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
# kernel of every argument key it has launched and calls its launcher directly (where the launcher is Triton's
# known one, the C function behind it: direct_launch). The key holds everything
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
            _note_unrecordable()
            return self.kernel[grid](*args, **kwargs)
        if entry is None:  # Triton's path, which compiles or finds the kernel; remember what it launched
            _note_unrecordable()
            compiled = self.kernel[grid](*args, **kwargs)
            if all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")) and \
                    not any(isinstance(v, torch.Tensor) for v in kwargs.values()):  # (keyed by identity)
                # the parameters after the positional ones, in the kernel's order (constexprs included: the
                # launcher skips them, as in Triton's run), fixed by the key
                tail = tuple(kwargs[n] if n in kwargs else self.defaults[n] for n in self.names[len(args):])
                remember(self.compiled, key, _entry(compiled, tail), MAX_KEYS)
            return compiled
        g = (*grid, 1, 1)
        entry.launcher(g[0], g[1], g[2], self.stream(key[1]), *entry.fixed, *args, *entry.tail)
        if _recording is not None and _recording_thread == _thread_id():  # (launch_replay: to be passed again)
            _recording.append((entry.launcher, g[:3], self.stream, key[1], entry.fixed, (*args, *entry.tail)))
        return entry.compiled


class LaunchEntry(NamedTuple):
    """A remembered specialisation: what a launch passes, after the grid and the stream, is fixed + the kernel's
    arguments + tail."""
    compiled: object  # Triton's compiled kernel
    tail: tuple  # the kernel's parameters after the positional arguments, fixed by the key
    launcher: Callable  # the C launch (direct_launch), or the compiled kernel's launcher
    fixed: tuple  # the launcher's arguments between the stream and the kernel's own
    direct: bool  # launcher is the C launch


def _entry(compiled, tail: tuple) -> LaunchEntry:
    direct = direct_launch(compiled.run)
    if direct is None:  # the launcher's own __call__
        return LaunchEntry(compiled, tail, compiled.run, (compiled.function, compiled.packed_metadata, None, None,
                                                          None), False)
    c_launch, cooperative, pdl = direct  # what that __call__ would pass its C function (no scratch: None twice)
    return LaunchEntry(compiled, tail, c_launch, (compiled.function, cooperative, pdl, None, None,
                                                  compiled.packed_metadata, None, None, None), True)


# The C launch behind a compiled kernel's launcher (`compiled.run`, Triton's CudaLauncher), called directly where
# the launcher's Python __call__ is one whose whole work we know: the source below (Triton 3.6's, up to
# indentation), which allocates no scratch when the kernel needs none and passes its arguments on, after two
# fixed flags and the two (absent) scratch buffers. A launcher with any other __call__ (another Triton version)
# or that needs scratch memory is called as it is. About 2 us of host time a launch on the H200 machines.
_KNOWN_LAUNCHER_CALL = """def __call__(self, gridX, gridY, gridZ, stream, function, *args):

    def allocate_scratch(size, align, allocator):
        if size > 0:
            grid_size = gridX * gridY * gridZ
            alloc_size = grid_size * self.num_ctas * size
            alloc_fn = allocator.get()
            return alloc_fn(alloc_size, align, stream)
        return None

    global_scratch = allocate_scratch(self.global_scratch_size, self.global_scratch_align, _allocation._allocator)
    profile_scratch = allocate_scratch(self.profile_scratch_size, self.profile_scratch_align,
                                       _allocation._profile_allocator)
    self.launch(gridX, gridY, gridZ, stream, function, self.launch_cooperative_grid, self.launch_pdl,
                global_scratch, profile_scratch, *args)
"""
_known_calls = {}  # launcher class -> whether its __call__ is _KNOWN_LAUNCHER_CALL


def direct_launch(launcher):
    """(C launch function, cooperative-grid flag, PDL flag) of a compiled kernel's launcher whose __call__ is
    _KNOWN_LAUNCHER_CALL and whose kernel needs no scratch memory, else None (call the launcher itself)."""
    cls = type(launcher)
    known = _known_calls.get(cls)
    if known is None:
        try:
            lines = inspect.getsource(cls.__call__).splitlines(keepends=True)
            indent = len(lines[0]) - len(lines[0].lstrip())
            source = "".join(line[indent:] if line.strip() else "\n" for line in lines)
        except (OSError, TypeError):  # (no source: a compiled or built-in launcher)
            source = None
        known = _known_calls[cls] = source == _KNOWN_LAUNCHER_CALL
    if not known or getattr(launcher, "global_scratch_size", 1) or getattr(launcher, "profile_scratch_size", 1):
        return None
    return launcher.launch, launcher.launch_cooperative_grid, launcher.launch_pdl


_launchers = {}  # id(kernel) -> (kernel, its FastLauncher or False: Triton's own path)


def interpreted(kernel) -> bool:
    """Whether `kernel` runs in Triton's interpreter (TRITON_INTERPRET=1: the kernel is no JITFunction)."""
    return not isinstance(kernel, JITFunction)


def _register(kernel):
    """kernel's FastLauncher, or False where launches take Triton's own path: kernels that are not JITFunctions
    (the interpreter's), or no GPU driver (Triton's path then says what is missing). Kept by the kernel's id (a
    JITFunction hashes in Python: a microsecond a launch), with the kernel itself to tell a reused id."""
    fast = False
    if isinstance(kernel, JITFunction):
        try:
            fast = FastLauncher(kernel)
        except RuntimeError:
            pass
    _launchers[id(kernel)] = (kernel, fast)
    return fast


def launch(kernel, grid, *args, **kwargs):
    """`kernel[grid](*args, **kwargs)`, with less host work for specialisations launched before (see above)."""
    if _fast_launch:
        entry = _launchers.get(id(kernel))
        fast = entry[1] if entry is not None and entry[0] is kernel else _register(kernel)
        # (pre-run hooks and launch hooks (Triton's profilers) are Triton's to call)
        if fast and not kernel.pre_run_hooks and not launch_hooks_set():
            return fast(grid, args, kwargs)
    _note_unrecordable()
    return kernel[grid](*args, **kwargs)


# While causal_conv1d.launch_replay records a call: a list of what each direct launch passed (launcher, grid,
# stream getter, device, the launcher's fixed arguments, the kernel's arguments), None for a launch that took
# Triton's own path (a recording holding one cannot be replayed). None when nothing records. Only the launches of
# the recording thread (_recording_thread) go into it: another thread's are not the recorded call's.
_recording = None
_recording_thread = None
_thread_id = threading.get_ident


def _note_unrecordable():
    if _recording is not None and _recording_thread == _thread_id():
        _recording.append(None)


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
    """Launch hooks set (Triton's profilers): they need Triton's own launch path. (None when unset in older
    Tritons; a HookChain, empty when unset, in 3.6 and later. No generator: this runs at every launch.)"""
    runtime = knobs.runtime
    enter, exit_ = runtime.launch_enter_hook, runtime.launch_exit_hook
    return ((enter is not None and bool(getattr(enter, "calls", True)))
            or (exit_ is not None and bool(getattr(exit_, "calls", True))))
