"""benchmarks/host_breakdown.py runs end to end on a CPU (small images) and leaves nothing wrapped behind."""
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
