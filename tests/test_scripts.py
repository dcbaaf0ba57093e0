"""The shell runners (scripts/train.sh, which scripts/vim-*.sh and ablations/*.sh call, and scripts/eval.sh):
one-line errors in a useful order, the process count, the torchrun command for one or several machines, and a
real (tiny) run through the runner."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(*argv, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("MODEL_PATH", "DATA_PATH", "NGPUS", "NNODES")}
    full.update(PYTHON=sys.executable, **env)
    return subprocess.run(["bash", *argv], cwd=ROOT, env=full, capture_output=True, text=True, timeout=300)


def test_the_starting_checkpoint_is_checked_first_and_says_where_it_comes_from():
    proc = sh("scripts/vim-s.sh")  # neither MODEL_PATH nor DATA_PATH
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: MODEL_PATH vim_s_midclstok_80p5acc.pth does not exist")
    assert "released by the Vim authors" in proc.stderr and "hustvl/Vim-small-midclstok" in proc.stderr
    proc = sh("ablations/token-only.sh", MODEL_PATH=__file__)
    assert proc.returncode == 2 and proc.stderr.startswith("error: set DATA_PATH"), proc.stderr
    proc = sh("scripts/train.sh", "no-such-row", MODEL_PATH=__file__, DATA_PATH=ROOT)
    assert proc.stderr.startswith("error: no config 'no-such-row'")
    proc = sh("scripts/eval.sh")
    assert proc.returncode == 2 and proc.stderr.startswith("error: set MODEL_PATH")


@pytest.mark.parametrize("env,expect", [
    (dict(CUDA_VISIBLE_DEVICES=""), [sys.executable, "main.py"]),  # no GPU: one plain process, no torchrun
    (dict(CUDA_VISIBLE_DEVICES="0,1"), ["torchrun", "--standalone", "--nproc_per_node=2", "main.py"]),
    (dict(NGPUS="4", NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1"),
     ["torchrun", "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=29500",
      "--nproc_per_node=4", "main.py"]),
])
def test_process_count_and_launcher(env, expect):
    proc = sh("scripts/vim-t.sh", "--epochs", "1", MODEL_PATH=__file__, DATA_PATH=ROOT, DRY_RUN="1", **env)
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout.split()
    assert cmd[:len(expect)] == expect, cmd
    assert cmd[len(expect):] == ["--config", "configs/vim-t.yaml", "--data-path", ROOT, "--model-path", __file__,
                                 "--output_dir", "output/vim-t", "--no_amp", "--epochs", "1"]


def test_several_machines_need_a_rank_and_an_address():
    proc = sh("scripts/vim-t.sh", MODEL_PATH=__file__, DATA_PATH=ROOT, DRY_RUN="1", NNODES="2")
    assert proc.returncode == 2 and "set NODE_RANK" in proc.stderr
    proc = sh("scripts/vim-t.sh", MODEL_PATH=__file__, DATA_PATH=ROOT, DRY_RUN="1", NNODES="2", NODE_RANK="0")
    assert proc.returncode == 2 and "set MASTER_ADDR" in proc.stderr


def test_a_tiny_run_through_the_runner(tmp_path):
    """ImageNet layout (train/ and val/ class folders), a dense starting checkpoint, a YAML that inherits a
    table row: the runner trains a DyVM step and writes the checkpoint where OUTPUT_DIR says."""
    from PIL import Image

    import dyvm  # noqa: F401
    from dyvm.models.registry import create_model
    for split in ("train", "val"):
        for c in range(2):
            folder = tmp_path / "data" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40, 40), (60 * c + 10 * i, 80, 120)).save(folder / f"{i}.png")
    size = dict(input_size=32, patch_size=8, depth=2, embed_dim=16)
    dense = create_model("vim_tiny", img_size=32, patch_size=8, depth=2, embed_dim=16, num_classes=2)
    torch.save({"model": dense.state_dict()}, tmp_path / "dense.pth")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"base: {os.path.join(ROOT, 'configs', 'vim-t.yaml')}\n" + "".join(
        f"{k}: {v}\n" for k, v in size.items()) + "batch_size: 4\nnum_workers: 0\nepochs: 1\nmax_steps_per_epoch: 1\n"
        "pruning_loc: [1]\ntoken_keep_ratios: null\nprogress: false\nmodel_ema: false\n")
    out = tmp_path / "out"
    proc = sh("scripts/train.sh", str(cfg), MODEL_PATH=str(tmp_path / "dense.pth"),
              DATA_PATH=str(tmp_path / "data"), OUTPUT_DIR=str(out), CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "teacher: frozen dense Vim from" in proc.stdout and (out / "checkpoint.pth").is_file()
