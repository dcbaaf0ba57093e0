"""benchmarks/kernels.py runs end to end (--dry-run: CPU, Triton interpreter, tiny shapes), so a broken
benchmark is caught here rather than on a rented GPU: the sweeps, the full-size checks against the
references (at tiny size), every timing path and the table."""
import json
import subprocess
import sys

from tests.benchmarks.helpers import dry_run, script_env


def test_kernel_benchmark_dry_run():
    # (python benchmarks/kernels.py --dry-run --sweep --save-tuning DIR/tuning.json --out DIR/bench.json, started
    # in the background when collection ended: tests.benchmarks.helpers.DRY_RUNS)
    env = script_env()
    returncode, output, folder = dry_run("test_kernel_benchmark_dry_run")
    out, tuning_file = folder / "bench.json", folder / "tuning.json"
    assert returncode == 0, output[-6000:]
    saved = json.loads(out.read_text())
    tuning = saved["meta"]["tuning"]
    assert set(tuning) == {"fwd", "bwd", "conv"} and set(tuning["fwd"]) == {"cf/4", "cf/2", "cl/4", "cl/2"}
    # every check is a relative error against the reference, within the kernel tests' tolerances
    for name, errs in saved["checks"].items():
        errs = errs.values() if isinstance(errs, dict) else errs
        limit = 1e-5 if "fp32" in name else 3e-2
        assert max(errs) < limit, (name, errs)
    for key in ("scan_fwd", "scan_fwd_cl", "scan_fwdbwd", "scan_fwdbwd_cl", "biscan_fwd_gate_off", "conv_fwd",
                "norm_fwdbwd"):
        assert any(k.startswith(key + "/") for k in saved["results"]), key
    assert "speed-up" in output

    # the saved launch parameters are what the kernels use under MAMBA_TRITON_TUNING
    show = ("from mamba_ssm.ops.triton import selective_scan as s; from causal_conv1d import triton_causal_conv1d "
            "as c; import json; print(json.dumps({'fwd': s.FWD_TUNING, 'bwd': s.BWD_TUNING, 'conv': c.CONV_TUNING}))")
    env["MAMBA_TRITON_TUNING"] = str(tuning_file)
    shown = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True, env=env, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == json.loads(tuning_file.read_text()) == tuning


def test_bad_tuning_file_is_named(tmp_path):
    bad = tmp_path / "tuning.json"
    bad.write_text(json.dumps({"fwd": {"cf/4": {"block_d": 32, "blok_d": 16}}}))  # a misspelt parameter
    env = dict(script_env(), MAMBA_TRITON_TUNING=str(bad))
    proc = subprocess.run([sys.executable, "-c", "import mamba_ssm.ops.triton.selective_scan"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and "MAMBA_TRITON_TUNING" in proc.stderr and "cf/4" in proc.stderr


def test_tuning_file_from_before_a_new_parameter_still_loads(tmp_path):
    """An entry written before a parameter existed keeps the built-in value of that parameter."""
    old = tmp_path / "tuning.json"
    old.write_text(json.dumps({"fwd": {"cf/4": {"block_d": 16, "num_warps": 2, "unroll": 8,
                                                "lanes_on_channels": False}}}))
    env = dict(script_env(), MAMBA_TRITON_TUNING=str(old))
    code = "import json; from mamba_ssm.ops.triton import selective_scan as s; print(json.dumps(s.FWD_TUNING['cf/4']))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    entry = json.loads(proc.stdout)
    assert entry["block_d"] == 16 and "prefetch" in entry
