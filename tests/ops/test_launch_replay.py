"""causal_conv1d.launch_replay: a call's direct launches recorded and replayed with new addresses.

CI has no GPU, so the mechanism is tested with stand-in kernels that compute on CPU memory from the addresses they
are given (as a GPU kernel would); benchmarks/gpu_check.py --sections launch checks the mixers' replays against
their ordinary calls at full size."""
import ctypes
import inspect

import pytest
import torch

from causal_conv1d import launch_replay, triton_utils
from causal_conv1d.launch_replay import build_plan, recording, replay, replayed
from causal_conv1d.triton_utils import FastLauncher


def _floats(ptr_or_tensor, n: int) -> torch.Tensor:
    """n float32 values at an address (or a tensor's), as a tensor over that memory."""
    ptr = ptr_or_tensor.data_ptr() if isinstance(ptr_or_tensor, torch.Tensor) else ptr_or_tensor
    return torch.frombuffer((ctypes.c_float * n).from_address(ptr), dtype=torch.float32)


class AxpyKernel:
    """A stand-in Triton kernel (JITFunction's interface as FastLauncher uses it) that computes
    out[i] = a[i] * alpha + b[i] for i < n, on the CPU memory its pointer arguments address."""

    def __init__(self):
        def kern(a_ptr, b_ptr, out_ptr, n, alpha, BLOCK=64):
            pass
        self.signature = inspect.signature(kern)
        self.arg_names = list(self.signature.parameters)
        self.calls = []  # ("triton" | "direct", pointer arguments as given)
        outer = self

        class Compiled:
            function, packed_metadata = "fn", "meta"

            def run(self, gx, gy, gz, stream, function, metadata, launch_metadata, enter, exit_, *values):
                assert (gx, gy, gz) == (1, 1, 1) and stream == 77 and function == "fn" and metadata == "meta"
                outer.calls.append(("direct", values[:3]))
                outer.compute(*values[:5])

        self.compiled_kernel = Compiled()

    def compute(self, a, b, out, n, alpha):
        _floats(out, n).copy_(_floats(a, n) * alpha + _floats(b, n))

    def __getitem__(self, grid):
        def call(*args, **kwargs):  # Triton's own path: compiles (here: nothing) and launches
            self.calls.append(("triton", args[:3]))
            self.compute(*args[:5])
            return self.compiled_kernel
        return call


@pytest.fixture
def kernels():
    k1, k2 = AxpyKernel(), AxpyKernel()
    fast = {k: FastLauncher(k, device=lambda: 0, stream=lambda device: 77) for k in (k1, k2)}
    return k1, k2, fast


def _op(fast, k1, k2, x: torch.Tensor, w: torch.Tensor, extra=None) -> torch.Tensor:
    """The kind of call replayed: allocations, views and launches. tmp = 2 x + w (one scratch tensor), then
    out = -tmp[1:] + x[:-1] (a view of each: offsets into an input and into the scratch); extra, when given, is a
    tensor read without being named to replayed (a mistake the plan's check must catch)."""
    n = x.numel()
    tmp = torch.empty(n, dtype=torch.float32)
    fast[k1]((1,), (x, w if extra is None else extra, tmp, n, 2.0), {})
    out = torch.empty(n + 3, dtype=torch.float32)[3:]  # (an output at an offset into its allocation)
    fast[k2]((1,), (tmp[1:], x[:-1], out, n - 1, -1.0), {})
    return out[:n - 1]


def _expected(x, w):
    return -(2 * x[1:] + w[1:]) + x[:-1]


def test_a_call_is_recorded_checked_and_then_replayed_on_new_inputs(kernels):
    k1, k2, fast = kernels
    w = torch.randn(40)
    memo = {}
    for step in range(5):
        x = torch.randn(40)
        before = len(k1.calls)
        out = replayed(memo, "key", lambda: _op(fast, k1, k2, x, w), (x,), (w,))
        torch.testing.assert_close(out, _expected(x, w), rtol=0, atol=1e-6)
        if step == 0:  # Triton's path (a first compile): not recordable, tried again
            assert memo["key"] == 1 and k1.calls[-1][0] == "triton"
        elif step == 1:  # recorded, then replayed once into NaN-filled scratch as its check: kept
            assert isinstance(memo["key"], launch_replay.Plan) and len(k1.calls) == before + 2
        else:  # replayed: the launches get addresses, the input's own and the scratch's
            assert len(k1.calls) == before + 1
            kind, pointers = k1.calls[-1]
            assert kind == "direct" and all(isinstance(p, int) for p in pointers)
            assert pointers[0] == x.data_ptr() and pointers[1] == w.data_ptr()
    plan = memo["key"]
    assert len(plan.launches) == 2 and plan.scratch_bytes % launch_replay.SLOT_ALIGN == 0
    # the output is a view of this call's scratch, at the recorded place, with the recorded shape
    assert out.shape == (39,) and out.stride() == (1,)


def test_a_tensor_read_but_not_named_fails_the_check_and_the_key_runs_as_it_is(kernels):
    k1, k2, fast = kernels
    w, hidden = torch.randn(24), torch.randn(24)  # hidden: read by the call, named neither input nor persistent
    memo = {}
    for _ in range(4):
        x = torch.randn(24)
        out = replayed(memo, "k", lambda: _op(fast, k1, k2, x, w, extra=hidden), (x,), (w,))
        torch.testing.assert_close(out, _expected(x, hidden), rtol=0, atol=1e-6)
    assert memo["k"] == launch_replay._FAILED
    assert k1.calls[-1][0] == "direct" and not isinstance(k1.calls[-1][1][0], int)  # the ordinary call's launches


def test_recordings_that_cannot_be_replayed_stop_after_a_few_attempts(kernels):
    k1, k2, fast = kernels
    memo = {}
    calls = []

    def op():
        calls.append(1)
        triton_utils._note_unrecordable()  # as a launch on Triton's own path notes itself
        return torch.zeros(3)
    for _ in range(launch_replay.MAX_ATTEMPTS + 2):
        replayed(memo, "k", op, (), ())
    assert memo["k"] == launch_replay._FAILED and len(calls) == launch_replay.MAX_ATTEMPTS + 2


def test_build_plan_refuses_what_it_cannot_replay(kernels):
    k1, k2, fast = kernels
    x, w = torch.randn(16), torch.randn(16)
    _op(fast, k1, k2, x, w)  # (compiled)
    with recording() as notes:
        out = _op(fast, k1, k2, x, w)
    assert build_plan([], (x,), (w,), out) is None  # no launches
    assert build_plan(notes + [None], (x,), (w,), out) is None  # a launch off the direct path
    assert build_plan(notes, (x,), (w,), x[:5]) is None  # an output that is not the call's own memory
    plan = build_plan(notes, (x,), (w,), out)
    assert plan is not None and plan.persistent[0] is w
    y = torch.randn(16)
    torch.testing.assert_close(replay(plan, (y,)), _expected(y, w), rtol=0, atol=1e-6)


def test_recording_inside_a_recording_leaves_the_launches_to_the_outer_one(kernels):
    k1, k2, fast = kernels
    x, w = torch.randn(8), torch.randn(8)
    _op(fast, k1, k2, x, w)
    with recording() as outer:
        with recording() as inner:
            assert inner is None
            _op(fast, k1, k2, x, w)
        memo = {}
        replayed(memo, "k", lambda: _op(fast, k1, k2, x, w), (x,), (w,))  # (records nothing of its own)
        assert "k" not in memo
    assert len(outer) == 4 and triton_utils._recording is None


def test_a_call_that_derives_into_the_memo_is_not_recorded(kernels):
    """Weights derived at their first use land in the memo, by launches later calls do not make: such a call's
    recording would replay them every time."""
    k1, k2, fast = kernels
    w = torch.randn(16)
    memo = {}
    _op(fast, k1, k2, torch.randn(16), w)  # (compiled)

    def op(x):
        memo.setdefault("derived", torch.ones(1))  # first call only
        return _op(fast, k1, k2, x, w)
    replayed(memo, "k", lambda: op(torch.randn(16)), (torch.randn(16),), (w,))
    assert memo["k"] == 1  # not recorded: an attempt
    x = torch.randn(16)
    replayed(memo, "k", lambda: op(x), (x,), (w,))
    assert isinstance(memo["k"], launch_replay.Plan)


def test_a_failed_check_stops_the_whole_family(kernels):
    k1, k2, fast = kernels
    w, hidden = torch.randn(16), torch.randn(16)
    memo = {}
    _op(fast, k1, k2, torch.randn(16), w)
    x = torch.randn(16)
    replayed(memo, "a", lambda: _op(fast, k1, k2, x, w, extra=hidden), (x,), (w,), family="fam")
    assert memo["a"] == launch_replay._FAILED and launch_replay.family_failed(memo, "fam")
    out = replayed(memo, "b", lambda: _op(fast, k1, k2, x, w), (x,), (w,), family="fam")
    assert "b" not in memo  # not even recorded
    torch.testing.assert_close(out, _expected(x, w), rtol=0, atol=1e-6)
    assert not launch_replay.family_failed(memo, None) and not launch_replay.family_failed(memo, "other")


def test_a_call_returning_several_tensors_is_replayed_with_each(kernels):
    k1, k2, fast = kernels
    w = torch.randn(32)
    memo = {}

    def op(x):
        out = _op(fast, k1, k2, x, w)
        return out, out[::2]  # (two views, of one allocation)
    for step in range(3):
        x = torch.randn(32)
        out, every_other = replayed(memo, "k", lambda: op(x), (x,), (w,))
        torch.testing.assert_close(out, _expected(x, w), rtol=0, atol=1e-6)
        assert torch.equal(every_other, out[::2]) and every_other.stride() == (2,)
    assert isinstance(memo["k"], launch_replay.Plan) and not memo["k"].single and len(memo["k"].outs) == 2


def test_replays_apply_to_eager_gpu_calls_only(monkeypatch):
    x = torch.zeros(4)
    assert not launch_replay.eager_replays_apply(x)  # (a CPU tensor)
    monkeypatch.setattr(launch_replay, "_enabled", False)
    assert not launch_replay.replays_enabled()


def test_another_threads_launches_stay_out_of_a_recording(kernels):
    import threading

    k1, k2, fast = kernels
    x, w = torch.randn(8), torch.randn(8)
    _op(fast, k1, k2, x, w)
    with recording() as notes:
        other = threading.Thread(target=lambda: _op(fast, k1, k2, x, w))
        other.start()
        other.join()
        seen = []
        t = threading.Thread(target=lambda: seen.append(replayed({}, "k", lambda: _op(fast, k1, k2, x, w), (x,),
                                                                   (w,))))
        t.start()
        t.join()  # (its own replayed call does not record while this thread's recording runs)
        assert not notes and len(seen) == 1
        _op(fast, k1, k2, x, w)
    assert len(notes) == 2


def test_a_pending_check_is_settled_only_once_the_gpu_has_its_verdict(kernels):
    """The GPU path's pending check, with a stand-in event: calls before the verdict arrives are made as they are;
    then the plan is used, or the key and its family fail."""
    k1, k2, fast = kernels
    w = torch.randn(16)
    _op(fast, k1, k2, torch.randn(16), w)
    x = torch.randn(16)
    with recording() as notes:
        out = _op(fast, k1, k2, x, w)
    plan = build_plan(notes, (x,), (w,), out)

    class Event:
        ready = False

        def query(self):
            return self.ready
    for verdict in (True, False):
        event, memo = Event(), {}
        memo["k"] = launch_replay._Pending(plan, torch.tensor(verdict), event)
        before = len(k1.calls)
        y = torch.randn(16)
        torch.testing.assert_close(replayed(memo, "k", lambda: _op(fast, k1, k2, y, w), (y,), (w,), family="f"),
                                   _expected(y, w), rtol=0, atol=1e-6)
        assert isinstance(memo["k"], launch_replay._Pending) and not isinstance(k1.calls[-1][1][0], int)
        event.ready = True
        replayed(memo, "k", lambda: _op(fast, k1, k2, y, w), (y,), (w,), family="f")
        if verdict:
            assert memo["k"] is plan and isinstance(k1.calls[-1][1][0], int)  # (replayed: addresses)
        else:
            assert memo["k"] == launch_replay._FAILED and launch_replay.family_failed(memo, "f")
        assert len(k1.calls) == before + 2
