"""benchmarks/train_small_ops.py: its checks on the CPU (Triton interpreter, tiny shapes)."""
import json

from tests.benchmarks.helpers import dry_run


def test_train_small_ops_dry_run():
    # (python benchmarks/train_small_ops.py --dry-run --json DIR/ops.json, started in the background when collection
    # ended: tests.benchmarks.helpers.DRY_RUNS)
    returncode, output, folder = dry_run("test_train_small_ops_dry_run", timeout=300)
    assert returncode == 0, output[-6000:]
    rows = json.loads((folder / "ops.json").read_text())["rows"]
    assert [r["op"].split(" ")[0] for r in rows] == ["x_proj", "dt_proj", "in_proj", "out_proj", "norm", "per-sample",
                                                     "per-sample"]
    # the fp32 weight gradients are not rounded to bf16 (about 2e-3 from the exact sums of the same bf16 products)
    assert all(r["new_err"] < 1e-5 < r["old_err"] for r in rows[:4]), rows[:4]
