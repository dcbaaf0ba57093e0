"""The demo pipeline (scripts/demo.sh) end to end on the embedded data set, shortened to a few small steps."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_script_runs_and_writes_the_report(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHON=sys.executable, OUT=str(tmp_path))
    proc = subprocess.run(
        ["bash", "scripts/demo.sh", "--epochs", "1", "--max-steps-per-epoch", "3", "--batch-size", "16",
         "--no-progress", "--throughput-batch-size", "16", "--throughput-iters", "2", "--val-fraction", "0.01"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    for row in ("top-1 (raw)", "top-1 (EMA)", "MACs, paper convention", "MACs, full (both directions)",
                "images/s (same run, CPU)", "Tokens kept per stage", "Block keep ratio"):
        assert row in report, row
    for fig in ("kept_tokens.png", "training_curves.png", "accuracy_vs_flops.png"):
        assert (tmp_path / "figures" / fig).stat().st_size > 1000, fig
    summary = json.loads((tmp_path / "report.json").read_text())
    assert summary["dyvm"]["tokens_kept_per_stage"] == [34.0, 24.0, 16.0]  # int(49 * 0.7^s)
    assert summary["dyvm"]["gmacs_paper"] < summary["dense"]["gmacs_paper"]
    assert summary["dense"]["images_per_s"] > 0 and summary["dyvm"]["images_per_s"] > 0
    assert summary["num_val_images"] == 97  # 1% of the 9716 unique images
