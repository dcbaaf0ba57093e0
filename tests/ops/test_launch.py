"""causal_conv1d.triton_utils.launch: direct launches of compiled Triton specialisations.

CI has no GPU, so the direct path is tested here against a stand-in kernel with Triton's interface (the GPU
check, benchmarks/gpu_check.py --sections launch, compares it with Triton's own launches at full size); the
kernels' own tests run through `launch` in the interpreter, which takes Triton's path."""
import inspect

import pytest
import torch
import torch.nn as nn

from causal_conv1d import triton_utils
from causal_conv1d.triton_utils import FastLauncher, Unkeyable, launch, specialization_key


class StandInKernel:
    """Triton's JITFunction interface as FastLauncher uses it: arg_names, signature, kernel[grid](...) returning
    a compiled kernel whose run(...) launches."""

    def __init__(self):
        def kern(x_ptr, n, scale, flag, BLOCK=64):
            pass
        self.signature = inspect.signature(kern)
        self.arg_names = list(self.signature.parameters)
        self.triton_launches, self.direct_launches = [], []
        outer = self

        class Compiled:
            function, packed_metadata = "fn", "meta"

            def run(self, gx, gy, gz, stream, function, metadata, launch_metadata, enter, exit_, *values):
                outer.direct_launches.append(((gx, gy, gz), stream, values))

        self.compiled_kernel = Compiled()

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.triton_launches.append((grid, args, kwargs))
            return self.compiled_kernel
        return call


@pytest.fixture
def stand_in():
    kernel = StandInKernel()
    return kernel, FastLauncher(kernel, device=lambda: 0, stream=lambda device: 1234)


def test_launch_key_separates_every_specialisation():
    x = torch.zeros(64)
    splits = {}
    key = lambda *args, **kw: specialization_key(args, kw, splits)  # noqa: E731
    assert key(x, 32, 0.5) == key(torch.ones(8), 32, 0.5)  # other tensors of the same dtype and alignment
    assert key(nn.Parameter(x), 32) != key(x, 32)  # (types are part of it: still the same specialisation)
    different = [key(x[1:], 32, 0.5), key(x.double(), 32, 0.5), key(x, 48, 0.5), key(x, 32, 0.25),
                 key(x, True, 0.5), key(x, None, 0.5), key(x, 32, 0.5, BLOCK=64), key(x, 32, 0.5, num_warps=4)]
    assert len(set(different + [key(x, 32, 0.5)])) == len(different) + 1
    assert key(x, True) != key(x, 1) and key(x, 1) != key(x, 1.0)  # bools and floats are not ints
    with pytest.raises(Unkeyable):
        key([1, 2])
    assert key() == key() and key(x) == key(torch.ones(2))  # no scalars; a single tensor


def test_repeated_specialisation_launches_directly(stand_in):
    kernel, fast = stand_in
    x = torch.zeros(64)
    fast((4,), (x, 32, 0.5, True), {"num_warps": 4})
    assert len(kernel.triton_launches) == 1 and not kernel.direct_launches  # first: Triton's path
    y = torch.ones(32)
    fast((4, 2), (y, 32, 0.5, True), {"num_warps": 4})
    assert len(kernel.triton_launches) == 1
    grid, stream, values = kernel.direct_launches[-1]
    assert grid == (4, 2, 1) and stream == 1234
    assert values[0] is y and values[1:] == (32, 0.5, True, 64)  # in the kernel's order, the default filled in
    fast((4,), (y,), {"n": 48, "scale": 1.5, "flag": True, "BLOCK": 64, "num_warps": 4})  # other spelling:
    assert len(kernel.triton_launches) == 2  # another key, so Triton's path
    fast((4,), (x,), {"n": 48, "scale": 1.5, "flag": True, "BLOCK": 64, "num_warps": 4})
    assert kernel.direct_launches[-1][2] == (x, 48, 1.5, True, 64)


@pytest.mark.parametrize("change", ["misaligned", "int", "bool", "constexpr", "option", "dtype"])
def test_any_specialisation_change_goes_through_triton(stand_in, change):
    kernel, fast = stand_in
    x = torch.zeros(64)
    args, kwargs = [x, 32, 0.5, True], {"BLOCK": 64, "num_warps": 4}
    fast((1,), tuple(args), dict(kwargs))
    if change == "misaligned":
        args[0] = x[2:]
    elif change == "int":
        args[1] = 33
    elif change == "bool":
        args[3] = False
    elif change == "constexpr":
        kwargs["BLOCK"] = 128
    elif change == "option":
        kwargs["num_warps"] = 8
    else:
        args[0] = x.half()
    fast((1,), tuple(args), kwargs)
    assert len(kernel.triton_launches) == 2 and not kernel.direct_launches


def test_unknown_argument_types_and_switch_take_triton(stand_in, monkeypatch):
    kernel, fast = stand_in
    for _ in range(2):
        fast((1,), ([1, 2], 32, 0.5, True), {})
        fast((1,), (torch.zeros(4), 32, 0.5, True), {"BLOCK": [64]})  # unhashable
        fast((1,), (torch.zeros(4), 32, 0.5, True), {"BLOCK": torch.zeros(1)})  # a tensor keyword: not kept
    assert len(kernel.triton_launches) == 6 and not kernel.direct_launches
    # launch(): kernels that are not Triton JIT functions (the interpreter's) and a disabled switch take kernel[grid]
    other = StandInKernel()
    for enabled in (True, False):
        with triton_utils.fast_launches(enabled):
            launch(other, (1,), torch.zeros(4), 16, 0.5, True)
    assert len(other.triton_launches) == 2


def test_remembered_keys_are_bounded(stand_in, monkeypatch):
    kernel, fast = stand_in
    monkeypatch.setattr(triton_utils, "MAX_KEYS", 3)
    x = torch.zeros(64)
    for n in range(5):  # five keys: the table starts afresh once it holds three
        fast((1,), (x, 16 * n, 0.5, True), {})
    assert len(fast.compiled) == 2 and len(kernel.triton_launches) == 5
    fast((1,), (x, 64, 0.5, True), {})  # still remembered
    assert len(kernel.triton_launches) == 5 and len(kernel.direct_launches) == 1


def test_no_gpu_driver_takes_triton_path(monkeypatch):
    """A Triton JIT kernel where no GPU driver is found (a CPU machine without the interpreter): launch() hands
    the call to Triton's own path, which says what is missing, and stops trying the direct one."""
    from triton.runtime.jit import JITFunction

    def kern(x_ptr, n):
        pass
    kernel = JITFunction(kern)
    calls = []
    kernel.run = lambda *args, grid, warmup, **kwargs: calls.append((grid, args))  # Triton's path, recorded

    def no_driver(*args, **kwargs):
        raise RuntimeError("0 active drivers")
    monkeypatch.setattr(triton_utils, "FastLauncher", no_driver)
    with triton_utils.fast_launches(True):
        for _ in range(2):
            launch(kernel, (3,), torch.zeros(2), 7)
    assert [c[0] for c in calls] == [(3,), (3,)] and triton_utils._launchers.pop(id(kernel))[1] is False
    hooked = JITFunction(kern)  # a kernel with pre-run hooks: Triton calls them, so Triton's path
    hooked.run = kernel.run
    hooked.pre_run_hooks.append(lambda *args, **kwargs: None)
    direct = []
    triton_utils._launchers[id(hooked)] = (hooked, lambda *args: direct.append(args))  # a working direct path
    try:
        launch(hooked, (5,), torch.zeros(2), 7)
        hooked.pre_run_hooks.clear()
        launch(hooked, (6,), torch.zeros(2), 7)
    finally:
        triton_utils._launchers.pop(id(hooked), None)
    assert calls[-1][0] == (5,) and [d[0] for d in direct] == [(6,)]


class StandInLauncher:
    """Triton 3.6's CudaLauncher as FastLauncher's direct path reads it: its C launch and flags."""

    def __init__(self, scratch=0):
        self.launches, self.calls = [], []
        self.global_scratch_size, self.profile_scratch_size = scratch, 0
        self.launch_cooperative_grid, self.launch_pdl = False, True
        self.launch = lambda *args: self.launches.append(args)

    def __call__(self, gridX, gridY, gridZ, stream, function, *args):
        self.calls.append((gridX, gridY, gridZ, stream, function, *args))


@pytest.mark.parametrize("scratch", [0, 128])
def test_direct_launch_calls_the_known_launchers_c_function(stand_in, monkeypatch, scratch):
    """Where the launcher's __call__ is the known one and needs no scratch, the C launch gets what that __call__
    would pass it; otherwise the launcher is called."""
    kernel, fast = stand_in
    launcher = StandInLauncher(scratch)
    kernel.compiled_kernel.run = launcher
    monkeypatch.setitem(triton_utils._known_calls, StandInLauncher, True)
    x = torch.zeros(64)
    for _ in range(2):
        fast((4, 2), (x, 32, 0.5, True), {})
    assert len(kernel.triton_launches) == 1
    if scratch:
        assert not launcher.launches and launcher.calls == [(4, 2, 1, 1234, "fn", "meta", None, None, None,
                                                             x, 32, 0.5, True, 64)]
    else:
        assert not launcher.calls and launcher.launches == [(4, 2, 1, 1234, "fn", False, True, None, None, "meta",
                                                             None, None, None, x, 32, 0.5, True, 64)]


def _launcher_from_source(tmp_path, call_source: str, name: str):
    """A launcher whose class's __call__ has this source, from a module file (inspect reads sources from files)."""
    import importlib.util

    body = "".join("    " + line if line.strip() else "\n" for line in call_source.splitlines(keepends=True))
    path = tmp_path / f"{name}.py"
    path.write_text("class Launcher:\n" + body)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    launcher = module.Launcher()
    launcher.global_scratch_size = launcher.profile_scratch_size = 0
    launcher.launch, launcher.launch_cooperative_grid, launcher.launch_pdl = print, False, True
    return launcher


def test_only_the_known_launcher_call_is_bypassed(tmp_path):
    """direct_launch recognises a launcher class whose __call__ is the known source (at any indentation), and no
    other: a changed line, the stand-in's own __call__."""
    known = triton_utils._KNOWN_LAUNCHER_CALL
    assert triton_utils.direct_launch(_launcher_from_source(tmp_path, known, "known")) == (print, False, True)
    changed = known.replace("global_scratch, profile_scratch, *args)", "global_scratch, profile_scratch, *args, 1)")
    assert changed != known and triton_utils.direct_launch(_launcher_from_source(tmp_path, changed, "changed")) is None
    assert triton_utils.direct_launch(StandInLauncher()) is None
