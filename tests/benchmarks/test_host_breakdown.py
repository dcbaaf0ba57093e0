"""benchmarks/host_breakdown.py runs end to end on a CPU (small images) and leaves nothing wrapped behind."""
import collections

import torch

from tests.benchmarks.helpers import load_benchmark


def test_host_breakdown_prints_components_and_unwraps(capsys):
    host_breakdown = load_benchmark("host_breakdown")
    before = [getattr(owner, name) for owner, name, _ in host_breakdown.COMPONENTS]
    host_breakdown.main(["--device", "cpu", "--batch-size", "2", "--img-size", "32", "--warmup", "1", "--iters", "2"])
    out = capsys.readouterr().out
    assert "== vim_small: host" in out and "== dyvm_vim_small: host" in out
    for label in ("pruning stage", "mix: conv, x/dt proj, scan, out_proj", "add + norm", "gate head"):
        assert label in out
    assert [getattr(owner, name) for owner, name, _ in host_breakdown.COMPONENTS] == before


def test_split_launches_times_or_skips_the_c_launcher_and_restores_the_cache():
    from causal_conv1d import triton_utils
    from causal_conv1d.triton_utils import FastLauncher
    from tests.ops.test_launch import StandInKernel

    host_breakdown = load_benchmark("host_breakdown")
    kernel = StandInKernel()
    fast = FastLauncher(kernel, device=lambda: 0, stream=lambda device: 7)
    x = torch.zeros(64)
    fast((2,), (x, 32, 0.5, True), {})  # Triton's path: the key is remembered
    cache, key_fn = dict(fast.compiled), triton_utils.specialization_key
    for skip in (False, True):
        totals = collections.defaultdict(float)
        before = len(kernel.direct_launches)
        with host_breakdown.split_launches(totals, skip=skip, launchers=[fast]):
            fast((2,), (x, 32, 0.5, True), {})
            fast((3,), (x, 32, 0.5, True), {})
        assert len(kernel.direct_launches) == before + (0 if skip else 2)
        assert totals["launches"] == 2 and totals["C launcher"] > 0 and totals["key"] > 0
        assert fast.compiled == cache and triton_utils.specialization_key is key_fn
    assert len(kernel.triton_launches) == 1


def test_launch_summary_states_the_best_case_ratio():
    host_breakdown = load_benchmark("host_breakdown")
    row = dict(launches=100, c_launcher_ms=2.0, key_ms=1.0)
    text = host_breakdown.launch_summary({
        "vim_small": dict(row, host_ms=10.0, gpu_ms=13.0, host_no_launcher_ms=8.0),
        "dyvm_vim_small": dict(row, host_ms=15.0, gpu_ms=8.0, host_no_launcher_ms=12.0)})
    # needs 13 / 1.3 = 10 ms; takes 15 now, 12 - 1 = 11 without launch costs: 13 / 11 = 1.18x at best
    assert "needs a forward in 10.00 ms" in text and "takes 15.00 ms now, 11.00 ms" in text and "1.18x" in text
