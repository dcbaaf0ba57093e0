"""torchrun on CPU: two gloo processes train a tiny DyVM (frozen teacher on each rank) and evaluate distributed."""
import json
import os
import subprocess
import sys

import torch

import dyvm  # noqa: F401
from dyvm.models.registry import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--data-set", "SYNTHETIC", "--synthetic-size", "48", "--input-size", "32", "--patch-size", "8",
        "--depth", "4", "--embed-dim", "32", "--batch-size", "4", "--num_workers", "0", "--no-progress",
        "--warmup-epochs", "0", "--device", "cpu"]


def test_two_gloo_processes(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    dense = tmp_path / "dense"  # the teacher: a dense Vim of the student's shape (weights do not matter here)
    dense.mkdir()
    teacher = create_model("vim_tiny", img_size=32, patch_size=8, depth=4, embed_dim=32, num_classes=10)
    torch.save({"model": teacher.state_dict()}, dense / "checkpoint.pth")
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "main.py", *TINY,
         "--model", "Vim-Tiny", "--model-path", str(dense / "checkpoint.pth"), "--epochs", "1",
         "--max-steps-per-epoch", "3", "--output_dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) on cpu" in proc.stdout
    assert proc.stdout.count("teacher: frozen dense Vim") == 1  # printed by rank 0; built on every rank
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert len(log) == 1 and log[0]["train_steps"] == 3
    assert log[0]["test_num_images"] == 12  # 48 // 4 synthetic val images, split over 2 ranks, each counted once
    assert log[0]["train_cls_kl_loss"] > 0
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    assert not any(k.startswith("module.") for k in ckpt["model"])  # the unwrapped model is saved
    # --eval under torchrun without distributed evaluation: every rank evaluates everything, nothing is summed
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "main.py", *TINY,
         "--model", "Vim-Tiny", "--model-path", str(out / "checkpoint.pth"), "--eval", "--no-dist-eval",
         "--no-throughput", "--output_dir", str(tmp_path / "eval")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert res["raw"]["num_images"] == res["ema"]["num_images"] == 12
    assert res["raw"]["acc1"] == log[0]["test_acc1"]  # the same weights as the distributed epoch-end evaluation
