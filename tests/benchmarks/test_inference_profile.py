"""benchmarks/inference_profile.py runs end to end on a CPU (tiny inputs) and names where the time goes: the
model's parts, DyVM's pruning stages and gate heads among them."""
from tests.benchmarks.helpers import load_benchmark


def test_dry_run_names_the_parts(capsys):
    script = load_benchmark("inference_profile")
    assert script.main(["--models", "dyvm_vim_tiny", "--dtypes", "fp32", "--batch-size", "1", "--img-size", "32",
                        "--device", "cpu", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "===== dyvm_vim_tiny fp32 batch 1 (realised block keep ratio" in out and "kernels:" in out
    for part in ("embed", "add + norm", "in_proj", "mixer", "gate heads"):
        assert f"part {part}" in out
    assert "3x" in out.split("part pruning stages")[1].splitlines()[0]  # three stages
