"""benchmarks/scan_backward_ab.py runs end to end (--dry-run: CPU, Triton interpreter, tiny shapes), saves what a
second checkout compares against, and reports a comparison."""
import torch

from tests.benchmarks.helpers import dry_run, load_benchmark


def test_scan_backward_ab_dry_run():
    # (python benchmarks/scan_backward_ab.py --dry-run --save DIR/grads.pt, started in the background when
    # collection ended: tests.benchmarks.helpers.DRY_RUNS)
    returncode, output, folder = dry_run("test_scan_backward_ab_dry_run", timeout=300)
    assert returncode == 0, output[-6000:]
    saved = torch.load(folder / "grads.pt")
    assert list(saved) == ["bf16 whole", "bf16 kept 11", "fp32 whole", "fp32 kept 11"]
    for _, grads in saved.values():
        assert {"du", "ddelta", "dA", "dB", "dC", "dz", "dgate"} <= set(grads)
        assert all(torch.isfinite(g).all() for g in grads.values())
    lines = load_benchmark("scan_backward_ab").report(saved, saved, "again")
    assert len(lines) == 4 and all("worst rel vs saved 0.00e+00" in line for line in lines)
    # after the kept length the per-position gradients are zeros (on whole sequences they are not)
    assert saved["fp32 whole"][1]["du"][..., 11:].any() and not saved["fp32 kept 11"][1]["du"][..., 11:].any()
