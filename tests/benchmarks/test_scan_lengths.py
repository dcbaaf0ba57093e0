"""benchmarks/scan_lengths.py runs end to end (--dry-run: CPU, Triton interpreter, tiny shapes): the scan kernels at
per-sample lengths give every sample the same outputs and gradients whatever the samples' order, which decides only
which program runs when (the kernels run the samples longest first)."""
import json

from tests.benchmarks.helpers import dry_run


def test_scan_lengths_dry_run():
    # (python benchmarks/scan_lengths.py --dry-run --json DIR/lengths.json, started in the background when
    # collection ended: tests.benchmarks.helpers.DRY_RUNS)
    returncode, output, folder = dry_run("test_scan_lengths_dry_run", timeout=300)
    assert returncode == 0, output[-6000:]
    rows = json.loads((folder / "lengths.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["whole"] + ["random", "sorted", "uniform"] * 2
    assert all(r["fwd_us"] is None for r in rows)  # (a dry run checks; it does not time)
    sorted_rows = [r for r in rows if r["variant"] == "sorted"]
    assert [r["mean_length"] for r in sorted_rows] == [r["mean_length"] for r in rows if r["variant"] == "random"]
