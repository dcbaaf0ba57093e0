"""Eager calls replayed at the level of their kernel launches: the host work of a call that only allocates, takes
views and launches Triton kernels, cut to its launches.

Why: eager inference on a GPU is bound by the host (docs/speed.md), and a mixer layer's Python (shape checks,
plans, views, launch keys: benchmarks/results/host_sampling_h200_2026-11-29.txt) costs several times its launches.
For a given key (shapes, strides, dtypes, alignments, options: everything the path's choices depend on) such a
call launches the same kernels with the same grids and scalars every time; only the addresses of its inputs and
of the memory it allocates change. `replayed` records the launches of one ordinary call (causal_conv1d.triton_utils
notes what every direct launch passed), works out where each tensor argument lives, and from then on makes the
call as: one allocation for everything the call allocated, each kernel launched through its C launcher with the
addresses patched in, the output a view of that allocation. Every launch still happens, in the same order, on the
current stream: this is eager execution with less host work, not a captured graph.

Where each tensor argument lives, at recording:
  an input      a per-call tensor the caller names (its address, plus the argument's offset from it, per call);
  persistent    memory of tensors the caller names as persistent (cached weights and what their memo holds): the
                same address every call;
  scratch       anything else: memory the call allocated for itself (one slot per storage, 512-byte aligned like the
                caching allocator's blocks, so the arguments' alignment, part of the kernels' specialisation, stays).
Before a plan is used it is checked: the call is replayed on the same inputs into a scratch filled with NaN, and
its outputs must equal the recorded call's bit for bit, its inputs unchanged (an input left out, or a launch the
recording missed, shows as NaN or a difference); a plan that fails is never used for that key. On a GPU the
check's verdict reaches the host without a sync: calls made before it arrives are ordinary ones. A recording that
holds a launch which did not take the direct path (a first compile, launch hooks, the interpreter), or of a call
that kept something new in the memo (weights derived at their first use: launches later calls do not make), is not
used; the next call records again.
"""
import os
import threading
from contextlib import contextmanager
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

import causal_conv1d.triton_utils as triton_utils
from causal_conv1d.kernel_utils import graph_capturing, ops_watched

ENABLED_ENV = "MAMBA_LAUNCH_REPLAY"  # =0: every call made as it is (a way out, and the A/B checks' switch)
_enabled = os.environ.get(ENABLED_ENV, "1") not in ("", "0")
SLOT_ALIGN = 512  # the CUDA caching allocator's block alignment: a scratch argument keeps its alignment
MAX_ATTEMPTS = 3  # recordings of one key that could not be used before that key stops trying
_start = threading.Lock()  # (two threads starting a recording at once: one records)
_FAILED = "failed"  # the memo's entry for a key whose plan failed its check (or never recorded)


class _Launch(NamedTuple):
    launcher: Callable  # the C launcher (or the compiled kernel's run)
    grid: tuple
    stream: Callable  # device -> the current raw stream
    device: int
    fixed: tuple  # the launcher's arguments between the stream and the kernel's own
    template: tuple  # the kernel's arguments, tensors replaced by addresses (0 where patched per call)
    patches: tuple  # (position, source, offset): source 0 the scratch allocation, i + 1 the i-th input


class Plan(NamedTuple):
    launches: tuple
    scratch_bytes: int
    device: torch.device
    outs: tuple  # per output: (dtype, shape, strides, element offset into the scratch)
    single: bool  # the call returned one tensor (else a tuple of them)
    persistent: tuple  # what the plan's fixed addresses point into: kept alive with it


def replays_enabled() -> bool:
    """Whether eager calls may be replayed (MAMBA_LAUNCH_REPLAY; benchmarks/eager_ab.py's switch)."""
    return _enabled


def eager_replays_apply(x: Tensor) -> bool:
    """What every replayed call needs (the caller adds its own: no gradient, cached weights, ...): replays enabled,
    x on a GPU, direct launches on, nothing tracing or watching the ops (they must see the calls), no CUDA-graph
    capture on x's device (its warm-up calls record; a capture takes the ordinary calls) and no launch hooks
    (Triton's profilers see Triton's own launch path only)."""
    return (replays_enabled() and x.is_cuda and triton_utils._fast_launch and not ops_watched()
            and not graph_capturing(x) and not triton_utils.launch_hooks_set())


@contextmanager
def recording():
    """Within the block, triton_utils notes this thread's launches into the yielded list; None (nothing noted here)
    while another recording runs: this thread's own (whose list then gets the launches) or another thread's."""
    with _start:
        if triton_utils._recording is not None:
            notes = None
        else:
            triton_utils._recording_thread = threading.get_ident()
            triton_utils._recording = notes = []
    if notes is None:
        yield None
        return
    try:
        yield notes
    finally:
        triton_utils._recording = triton_utils._recording_thread = None


def _tensors_in(obj, found: list) -> list:
    """Every tensor in obj (tensors, tuples, lists, dict values, nested), appended to found."""
    if isinstance(obj, Tensor):
        found.append(obj)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            _tensors_in(item, found)
    elif isinstance(obj, dict):
        for item in obj.values():
            _tensors_in(item, found)
    return found


def _extent(t: Tensor) -> tuple:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def _outputs(out) -> Optional[tuple]:
    """A call's result as a tuple of tensors, or None where it is something else."""
    outs = out if isinstance(out, tuple) else (out,)
    return outs if outs and all(isinstance(t, Tensor) for t in outs) else None


def build_plan(notes: list, inputs: Sequence[Optional[Tensor]], persistent, out) -> Optional[Plan]:
    """A Plan from a recording (see the module's docstring), or None where it cannot be one: a launch off the direct
    path, no launches, an output (a tensor or a tuple of them) that is not memory the call allocated, or arguments
    of other devices."""
    outs = _outputs(out)
    if not notes or any(n is None for n in notes) or outs is None:
        return None
    input_extents = [(*_extent(t), t.data_ptr()) if t is not None else None for t in inputs]
    kept = _tensors_in(persistent, [])
    kept_extents = [_extent(t) for t in kept]
    slots = {}  # storage start -> (slot number, its bytes)

    def source(t: Tensor) -> tuple:
        """(source, offset) of a tensor argument: see _Launch.patches; source -1: a fixed address."""
        ptr = t.data_ptr()
        for i, extent in enumerate(input_extents):
            if extent is not None and extent[0] <= ptr < extent[1]:
                return i + 1, ptr - extent[2]
        if ptr == 0 or any(lo <= ptr < hi for lo, hi in kept_extents):
            return -1, ptr
        lo, hi = _extent(t)
        slot = slots.setdefault(lo, (len(slots), hi - lo))
        return 0, (slot[0], ptr - lo)

    device = outs[0].device
    raw = []
    for launcher, grid, stream, dev, fixed, args in notes:
        template, patches = [], []
        for pos, a in enumerate(args):
            if isinstance(a, Tensor):
                if a.device != device:
                    return None
                src, offset = source(a)
                template.append(offset if src == -1 else 0)
                if src != -1:
                    patches.append((pos, src, offset))
            else:
                template.append(a)
        raw.append((launcher, grid, stream, dev, fixed, tuple(template), patches))
    if any(t.untyped_storage().data_ptr() not in slots for t in outs):
        return None
    starts, total = {}, 0
    for number, nbytes in sorted(slots.values()):
        starts[number] = total
        total += -(-nbytes // SLOT_ALIGN) * SLOT_ALIGN
    launches = tuple(
        _Launch(launcher, grid, stream, dev, fixed, template,
                tuple((pos, src, starts[off[0]] + off[1] if src == 0 else off) for pos, src, off in patches))
        for launcher, grid, stream, dev, fixed, template, patches in raw)
    specs = []
    for t in outs:
        byte_offset = starts[slots[t.untyped_storage().data_ptr()][0]] + t.data_ptr() - t.untyped_storage().data_ptr()
        if byte_offset % t.element_size():
            return None
        specs.append((t.dtype, tuple(t.shape), t.stride(), byte_offset // t.element_size()))
    return Plan(launches, max(total, SLOT_ALIGN), device, tuple(specs), not isinstance(out, tuple), tuple(kept))


def replay(plan: Plan, inputs: Sequence[Optional[Tensor]], fill: Optional[int] = None):
    """The plan's launches on these inputs; returns the output(s) (views of this call's scratch allocation).
    fill: a byte to fill the scratch with first (the plan's check)."""
    scratch = torch.empty(plan.scratch_bytes, dtype=torch.uint8, device=plan.device)
    if fill is not None:
        scratch.fill_(fill)
    bases = [scratch.data_ptr()] + [t.data_ptr() if t is not None else 0 for t in inputs]
    for launcher, grid, stream, device, fixed, template, patches in plan.launches:
        args = list(template)
        for pos, src, offset in patches:
            args[pos] = bases[src] + offset
        launcher(grid[0], grid[1], grid[2], stream(device), *fixed, *args)
    if plan.single:
        dtype, shape, strides, offset = plan.outs[0]
        return scratch.view(dtype).as_strided(shape, strides, offset)
    return tuple(scratch.view(dtype).as_strided(shape, strides, offset) for dtype, shape, strides, offset in plan.outs)


def family_failed(memo: dict, family) -> bool:
    """Whether a plan of this family (see replayed) failed its check: its calls are made as they are."""
    return family is not None and memo.get(family) == _FAILED


def _fail(memo: dict, key, family) -> None:
    memo[key] = _FAILED
    if family is not None:
        memo[family] = _FAILED


class _Pending(NamedTuple):
    """A plan whose check is still running on the GPU: its verdict, copied to pinned memory behind an event."""
    plan: Plan
    verdict: Tensor
    done: "torch.cuda.Event"


def replayed(memo: dict, key, call: Callable, inputs: Sequence[Optional[Tensor]], persistent, family=None):
    """call() (which returns a tensor it allocated, or a tuple of them, from only allocations, views and direct
    Triton launches), made by its plan in memo[key] where one was kept; else made as it is, recorded, and a plan
    built, checked and kept. inputs: the call's per-call tensors; persistent: what it reads that stays (see the
    module's docstring). family: a key shared by calls that take the same path whatever their shapes: once a plan
    of one fails its check (the path does work other than Triton launches, say), the family's other calls are not
    recorded. On a GPU the check's verdict is read by a later call once the GPU has it (no call waits for it)."""
    if family_failed(memo, family):
        return call()
    entry = memo.get(key)
    if isinstance(entry, _Pending):
        entry = _settle(memo, key, family, entry)
    if isinstance(entry, Plan):
        return replay(entry, inputs)
    if entry == _FAILED or isinstance(entry, _Pending):
        return call()
    return _record(memo, key, call, inputs, persistent, family, attempts=entry or 0)


def _settle(memo: dict, key, family, pending: _Pending):
    """A pending check's outcome once the GPU has it: the plan, or _FAILED; the pending entry while it runs."""
    if not pending.done.query():
        return pending
    if bool(pending.verdict):
        memo[key] = pending.plan
        return pending.plan
    _fail(memo, key, family)
    return _FAILED


def _record(memo: dict, key, call: Callable, inputs, persistent, family, attempts: int):
    """call() made as it is and recorded; memo[key] becomes the checked plan (on a GPU: its pending check), the
    attempts made so far where the recording cannot be used, or _FAILED."""
    kept = len(memo)
    with recording() as notes:
        out = call()
    if notes is None:  # (inside another recording)
        return out
    # (a call that kept something new in the memo derived it: launches that later calls do not make)
    plan = build_plan(notes, inputs, persistent, out) if len(memo) == kept else None
    if plan is None:
        memo[key] = _FAILED if attempts + 1 >= MAX_ATTEMPTS else attempts + 1
        return out
    checked = _check(plan, inputs, out)
    if checked is _FAILED:
        _fail(memo, key, family)
    else:
        memo[key] = checked
    return out


def _check(plan: Plan, inputs, out):
    """The plan replayed on the recorded call's inputs into NaN-filled scratch (0xFF bytes: NaN in every float
    format): the plan where its outputs equal the call's bit for bit and its inputs are unchanged, else _FAILED; on a
    GPU a _Pending whose verdict arrives without a sync."""
    snapshots = [(t.clone(), t) for t in inputs if t is not None]
    outs, checks = _outputs(out), _outputs(replay(plan, inputs, fill=0xFF))
    if any(c.shape != o.shape or c.dtype != o.dtype for c, o in zip(checks, outs)):
        return _FAILED
    verdict = torch.stack([torch.eq(a, b).all() for a, b in (*zip(checks, outs), *snapshots)]).all()
    if not outs[0].is_cuda:
        return plan if bool(verdict) else _FAILED
    host = torch.empty((), dtype=torch.bool, pin_memory=True)
    host.copy_(verdict, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return _Pending(plan, host, done)
