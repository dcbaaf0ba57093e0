"""benchmarks/scan_train_tuning.py runs end to end (--dry-run: CPU, Triton interpreter, tiny shapes) and writes a
tuning file that the kernels accept under MAMBA_TRITON_TUNING."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_scan_train_tuning_dry_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'mamba-1p1p1'}{os.pathsep}{ROOT}")
    tuning_file, results = tmp_path / "tuning.json", tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scan_train_tuning.py"), "--dry-run",
                           "--out", str(tuning_file), "--results", str(results)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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
