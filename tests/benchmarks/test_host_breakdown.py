"""benchmarks/host_breakdown.py runs end to end on a CPU (small images) and leaves nothing wrapped behind."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_host_breakdown_prints_components_and_unwraps(capsys):
    spec = importlib.util.spec_from_file_location("host_breakdown", ROOT / "benchmarks" / "host_breakdown.py")
    host_breakdown = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host_breakdown)
    before = [getattr(owner, name) for owner, name, _ in host_breakdown.COMPONENTS]
    host_breakdown.main(["--device", "cpu", "--batch-size", "2", "--img-size", "32", "--warmup", "1", "--iters", "2"])
    out = capsys.readouterr().out
    assert "== vim_small: host" in out and "== dyvm_vim_small: host" in out
    for label in ("pruning stage", "mix: conv, x/dt proj, scan, out_proj", "add + norm", "gate head"):
        assert label in out
    assert [getattr(owner, name) for owner, name, _ in host_breakdown.COMPONENTS] == before
