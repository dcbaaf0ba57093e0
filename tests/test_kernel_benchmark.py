"""benchmarks/kernels.py runs end to end (--dry-run: CPU, Triton interpreter, tiny shapes), so a broken
benchmark is caught here rather than on a rented GPU: the sweeps, the full-size checks against the
references (at tiny size), every timing path and the table."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_benchmark_dry_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'mamba-1p1p1'}{os.pathsep}{ROOT}")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--dry-run", "--sweep",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = json.loads(out.read_text())
    tuning = saved["meta"]["tuning"]
    assert set(tuning) == {"fwd", "bwd", "conv"} and set(tuning["fwd"]) == {"cf", "cl"}
    # every check is a relative error against the reference, within the kernel tests' tolerances
    for name, errs in saved["checks"].items():
        errs = errs.values() if isinstance(errs, dict) else errs
        limit = 1e-5 if "fp32" in name else 3e-2
        assert max(errs) < limit, (name, errs)
    for key in ("scan_fwd", "scan_fwd_cl", "scan_fwdbwd", "scan_fwdbwd_cl", "biscan_fwd_gate_off", "conv_fwd",
                "norm_fwdbwd"):
        assert any(k.startswith(key + "/") for k in saved["results"]), key
    assert "speed-up" in proc.stdout
