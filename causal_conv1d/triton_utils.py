"""Triton device helpers shared by the kernels of both packages (triton_causal_conv1d.py and mamba_ssm's
ops/triton/selective_scan.py). A leaf: imports Triton and nothing of either package."""
import inspect
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


# Host-side launch arithmetic in plain integers: triton.cdiv / triton.next_power_of_2 are constexpr functions
# whose host calls cost a microsecond or more each, several times per layer of every eager forward.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# ---- Kernel launches with less host work ------------------------------------------------------------------
# `kernel[grid](*args, **kwargs)` costs about 45 us of host time per launch on the H200 machines (Triton's
# binder specialises every argument, builds the cache key, checks globals, then calls the C launcher), and eager
# inference is bound by the host: some 100 launches per Vim-S forward. `launch` keeps, per kernel, the compiled
# kernel for every specialisation it has launched, keyed by what Triton specialises on (each tensor's dtype and
# 16-byte alignment, each integer's value 1 / divisibility by 16 / 32-bit range, the type of bools, floats and
# None, constexpr and option values), and calls its launcher directly. A key not seen yet goes through Triton
# (which compiles or finds the kernel) and is remembered. Anything unusual takes Triton's own path: the
# interpreter, launch hooks (Triton's profilers), an argument of another type, MAMBA_TRITON_FAST_LAUNCH=0.
FAST_LAUNCH_ENV = "MAMBA_TRITON_FAST_LAUNCH"
_fast_launch = os.environ.get(FAST_LAUNCH_ENV, "1") not in ("", "0")
_INT32 = (-(2 ** 31), 2 ** 31)


class Unkeyable(TypeError):
    """An argument whose specialisation `specialization_key` does not know."""


def _arg_key(v):
    t = type(v)
    if t is int:
        if v == 1:
            return 1
        return (2 if v & 15 == 0 else 3) if _INT32[0] <= v < _INT32[1] else (4 if v & 15 == 0 else 5)
    if t is torch.Tensor or isinstance(v, torch.Tensor):
        return v.dtype, v.data_ptr() & 15 == 0
    if t is float:
        return float
    if v is None or t is bool or t is str:
        return t, v
    raise Unkeyable(f"no launch key for an argument of type {t.__name__}")


def specialization_key(args, kwargs) -> tuple:
    """What Triton's choice of compiled kernel depends on, for these launch arguments (see above)."""
    return tuple(map(_arg_key, args)), tuple(kwargs.items())


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
        self.compiled = {}

    def __call__(self, grid, args, kwargs):
        try:
            key = specialization_key(args, kwargs), self.device()
        except Unkeyable:
            return self.kernel[grid](*args, **kwargs)
        compiled = self.compiled.get(key)
        if compiled is None:  # Triton's path, which compiles or finds the kernel; remember what it launched
            compiled = self.kernel[grid](*args, **kwargs)
            if all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
                self.compiled[key] = compiled
            return compiled
        # every parameter in the kernel's order, constexprs included (the launcher skips them, as in Triton's run)
        values = list(args)
        for name in self.names[len(args):]:
            values.append(kwargs[name] if name in kwargs else self.defaults[name])
        g = (*grid, 1, 1)
        compiled.run(g[0], g[1], g[2], self.stream(key[1]), compiled.function, compiled.packed_metadata,
                     None, None, None, *values)
        return compiled


_launchers = {}


def launch(kernel, grid, *args, **kwargs):
    """`kernel[grid](*args, **kwargs)`, with less host work for specialisations launched before (see above)."""
    if _fast_launch and isinstance(kernel, JITFunction) and not launch_hooks_set():  # (interpreted kernels
        fast = _launchers.get(kernel)                                                  # are not JITFunctions)
        if fast is None:
            fast = _launchers[kernel] = FastLauncher(kernel)
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
