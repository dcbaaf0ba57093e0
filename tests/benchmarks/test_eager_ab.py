"""benchmarks/eager_ab.py runs end to end on a CPU (small images), alternates the two settings and puts the switch
back; a name that is not a function is one clear line."""
import pytest

from tests.benchmarks.helpers import load_benchmark

SWITCH = "mamba_ssm.ops.bimamba_stacked._gate_in_projections"


def test_eager_ab_alternates_and_restores_the_switch(capsys):
    import mamba_ssm.ops.bimamba_stacked as stacked

    eager_ab = load_benchmark("eager_ab")
    before = stacked._gate_in_projections
    eager_ab.main([SWITCH, "--model", "dyvm_vim_tiny", "--device", "cpu", "--img-size", "32", "--batch-size", "2",
                   "--dtype", "fp32", "--rounds", "2"])
    out = capsys.readouterr().out
    assert "on: host per forward median" in out and "off: host per forward median" in out
    assert "rounds where on > off:" in out and out.count("/") >= 2
    assert stacked._gate_in_projections is before


def test_eager_ab_names_a_switch_that_is_no_function():
    eager_ab = load_benchmark("eager_ab")
    with pytest.raises(SystemExit, match="is not a function"):
        eager_ab.main(["mamba_ssm.ops.bimamba_stacked.MISSING", "--device", "cpu"])
