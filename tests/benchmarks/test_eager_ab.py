"""benchmarks/eager_ab.py runs end to end on a CPU (small images), alternates the two settings and puts the switch
back; a name that is not a function is one clear line."""
import json

import pytest

from tests.benchmarks.helpers import load_benchmark

SWITCH = "mamba_ssm.ops.bimamba_stacked._gate_in_projections"


def test_eager_ab_alternates_and_restores_the_switch(capsys, tmp_path):
    import mamba_ssm.ops.bimamba_stacked as stacked

    eager_ab = load_benchmark("eager_ab")
    before = stacked._gate_in_projections
    eager_ab.main([SWITCH, "--model", "dyvm_vim_tiny", "--device", "cpu", "--img-size", "32", "--batch-size", "2",
                   "--dtype", "fp32", "--rounds", "2", "--json", str(tmp_path / "ab.json")])
    out = capsys.readouterr().out
    assert "on: host per forward median" in out and "off: host per forward median" in out
    assert "rounds where on > off:" in out and "sign test p =" in out
    assert stacked._gate_in_projections is before
    saved = json.loads((tmp_path / "ab.json").read_text())
    assert saved["summary"]["rounds"] == 2 and saved["args"]["switch"] == SWITCH
    for setting in ("on", "off"):  # 5 forwards timed on the host per round, one rate per round
        assert len(saved["settings"][setting]["host_s"]) == 10 and len(saved["settings"][setting]["images_per_s"]) == 2


def test_sign_test_p_values():
    sign_test = load_benchmark("eager_ab").sign_test
    assert sign_test(0, 10) == 1.0 and sign_test(10, 10) == 2 ** -10
    assert abs(sign_test(88, 136) - 0.00038) < 0.00001  # the gate-in-projections runs
    assert abs(sign_test(10, 20) - 0.588) < 0.001


def test_eager_ab_names_a_switch_that_is_no_function():
    eager_ab = load_benchmark("eager_ab")
    with pytest.raises(SystemExit, match="is not a function"):
        eager_ab.main(["mamba_ssm.ops.bimamba_stacked.MISSING", "--device", "cpu"])
