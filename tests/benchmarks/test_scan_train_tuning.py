"""benchmarks/scan_train_tuning.py runs end to end (--dry-run: CPU, Triton interpreter, tiny shapes) and writes a
tuning file that the kernels accept under MAMBA_TRITON_TUNING."""
import json
import subprocess
import sys

from tests.benchmarks.helpers import dry_run, load_benchmark, script_env


def test_scan_train_tuning_dry_run():
    # (python benchmarks/scan_train_tuning.py --dry-run --out DIR/tuning.json --results DIR/rows.json, started in
    # the background when collection ended: tests.benchmarks.helpers.DRY_RUNS)
    env = script_env()
    returncode, output, folder = dry_run("test_scan_train_tuning_dry_run", timeout=300)
    tuning_file, results = folder / "tuning.json", folder / "rows.json"
    assert returncode == 0, output[-6000:]
    rows = json.loads(results.read_text())["rows"]
    for name in ("bf16", "fp32"):  # every configuration agrees with the reference launch
        assert {r["kernel"] for r in rows[name]} == {"fwd+ckpt", "bwd"}
        assert all(r.get("rel_vs_default", r.get("rel_vs_first")) < 1e-4 for r in rows[name]), rows[name]
    show = ("from mamba_ssm.ops.triton import selective_scan as s; import json; "
            "print(json.dumps({'fwd': s.FWD_TUNING, 'bwd': s.BWD_TUNING}))")
    env["MAMBA_TRITON_TUNING"] = str(tuning_file)
    shown = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True, env=env, timeout=120)
    assert shown.returncode == 0, shown.stderr
    tables, saved = json.loads(shown.stdout), json.loads(tuning_file.read_text())
    for section in ("fwd", "bwd"):
        for key, entry in saved[section].items():
            assert {k: tables[section][key][k] for k in entry} == entry


def test_backward_configurations_from_the_command_line():
    import argparse

    import pytest

    tuning = load_benchmark("scan_train_tuning")
    assert dict(zip(tuning.BWD_KEYS, tuning._bwd_config("16,1,0,8,,168,4,0,0,1,0"))) == {
        "block_d": 16, "num_warps": 1, "prefetch": False, "sub_chunk": 8, "scratch_evict": "", "maxnreg": 168,
        "sum_steps": 4, "lane_sums": False, "smem_scratch": False, "l2_prefetch": True, "l1_prefetch": False}
    # (lane_sums, smem_scratch and the prefetches left out, as written before they existed)
    assert tuning._bwd_config("16,1,0,8,,168,4")[-4:] == (True, True, True, True)
    assert tuning._bwd_config("16,1,0,8,,168,4,0")[-4:] == (False, True, True, True)
    assert tuning._bwd_config("16,1,0,8,,168,4,0,0,0")[-4:] == (False, False, False, True)
    for bad in ("32,1,1,8", "32,1,yes,8,evict_last,0,4", "32,1,1,8,evict_last,0,4,1,1,1,1,1"):
        with pytest.raises(argparse.ArgumentTypeError, match="32,1"):
            tuning._bwd_config(bad)
