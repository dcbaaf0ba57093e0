"""causal_conv1d.triton_utils.launch: direct launches of compiled Triton specialisations.

CI has no GPU, so the direct path is tested here against a stand-in kernel with Triton's interface (the GPU
check, benchmarks/gpu_check.py --sections launch, compares it with Triton's own launches at full size); the
kernels' own tests run through `launch` in the interpreter, which takes Triton's path."""
import inspect

import pytest
import torch

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


def test_specialization_key_follows_what_triton_specialises_on():
    x = torch.zeros(64)
    key = lambda *args, **kw: specialization_key(args, kw)  # noqa: E731
    assert key(x, 32) == key(torch.ones(8), 48)  # aligned fp32 tensors, multiples of 16
    assert key(x, 32) != key(x[1:], 32)  # a pointer off 16-byte alignment
    assert key(x, 32) != key(x.double(), 32)
    assert len({key(v) for v in (1, 2, 16, 17, 2 ** 31, 2 ** 31 + 1, -16)}) == 5  # 1; %16 / other, int32 / int64
    assert key(16) == key(-16) and key(2) == key(17)
    assert key(True) != key(1) and key(True) != key(False)  # bools are not ints
    assert key(None) != key(0) and key(0.5) == key(2.0)
    assert key(x, BLOCK=64) != key(x, BLOCK=128) and key(x, num_warps=4) != key(x, num_warps=8)
    with pytest.raises(Unkeyable):
        key([1, 2])


def test_repeated_specialisation_launches_directly(stand_in):
    kernel, fast = stand_in
    x = torch.zeros(64)
    fast((4,), (x, 32, 0.5, True), {"num_warps": 4})
    assert len(kernel.triton_launches) == 1 and not kernel.direct_launches  # first: Triton's path
    y = torch.ones(32)
    fast((4, 2), (y, 48, 1.5, True), {"num_warps": 4})
    assert len(kernel.triton_launches) == 1
    grid, stream, values = kernel.direct_launches[-1]
    assert grid == (4, 2, 1) and stream == 1234
    assert values[0] is y and values[1:] == (48, 1.5, True, 64)  # in the kernel's order, the default filled in
    fast((4,), (y,), {"n": 48, "scale": 1.5, "flag": True, "BLOCK": 64, "num_warps": 4})  # other spelling:
    assert len(kernel.triton_launches) == 2  # another key, so Triton's path


@pytest.mark.parametrize("change", ["misaligned", "int_class", "bool", "constexpr", "option", "dtype"])
def test_any_specialisation_change_goes_through_triton(stand_in, change):
    kernel, fast = stand_in
    x = torch.zeros(64)
    args, kwargs = [x, 32, 0.5, True], {"BLOCK": 64, "num_warps": 4}
    fast((1,), tuple(args), dict(kwargs))
    if change == "misaligned":
        args[0] = x[2:]
    elif change == "int_class":
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
    assert len(kernel.triton_launches) == 2 and not kernel.direct_launches
    # launch(): kernels that are not Triton JIT functions (the interpreter's) and a disabled switch take kernel[grid]
    other = StandInKernel()
    for enabled in (True, False):
        with triton_utils.fast_launches(enabled):
            launch(other, (1,), torch.zeros(4), 16, 0.5, True)
    assert len(other.triton_launches) == 2
