"""`python main.py seg` end to end on tiny models and embedded scenes: training, outputs, fine-tuning DyVM from
the dense segmenter, --eval, exact resume, one-line errors."""
import json
import os
import sys

import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
sys.path.insert(0, ROOT)
import main as harness  # noqa: E402

TINY = ["--crop-size", "32", "--scene-size", "40", "--patch-size", "4", "--depth", "4", "--embed-dim", "32",
        "--d-state", "8", "--decode-channels", "16", "--aux-channels", "8", "--batch-size", "4", "--lr", "1e-3",
        "--warmup-iters", "1", "--log-interval", "1", "--eval-interval", "0", "--val-scenes", "3", "--num_workers",
        "0", "--no-progress", "--throughput-batch-size", "2", "--throughput-iters", "2"]


def seg(*argv):
    return harness.main(["seg", *TINY, *argv])


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("seg_dense")
    assert seg("--model", "vim_tiny", "--max-iters", "2", "--output_dir", str(out)) == 0
    return out


def test_dense_training_writes_the_house_outputs(dense_dir):
    for name in ("checkpoint.pth", "best_checkpoint.pth", "log.txt", "args.yaml"):
        assert (dense_dir / name).is_file(), name
    assert any(p.name.startswith("events.out.tfevents") for p in (dense_dir / "tensorboard").iterdir())
    lines = [json.loads(line) for line in (dense_dir / "log.txt").read_text().splitlines()]
    assert [r["iter"] for r in lines] == [1, 2, 2]  # two training lines, then the final evaluation
    assert {"train_loss", "train_decode_loss", "train_aux_loss", "lr"} <= set(lines[0])
    assert {"val_mIoU", "val_mAcc", "val_aAcc"} <= set(lines[2])
    ckpt = torch.load(dense_dir / "checkpoint.pth", weights_only=False)
    assert ckpt["iteration"] == 2 and {"model", "optimizer", "args"} <= set(ckpt)
    assert yaml.safe_load((dense_dir / "args.yaml").read_text())["model"] == "vim_tiny"


@pytest.fixture(scope="module")
def dyvm_dir(dense_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg_dyvm")
    assert seg("--model", "dyvm_vim_tiny", "--token-keep-ratio", "0.7", "--model-path",
               str(dense_dir / "checkpoint.pth"), "--max-iters", "2", "--output_dir", str(out)) == 0
    return out


def test_dyvm_fine_tuned_from_the_dense_segmenter_then_evaluated(dyvm_dir, capsys):
    line = json.loads((dyvm_dir / "log.txt").read_text().splitlines()[0])
    for term in ("token_pruning_loss", "block_pruning_loss", "block_keep_ratio", "token_keep_stage0"):
        assert f"train_{term}" in line, term
    assert seg("--model", "dyvm_vim_tiny", "--token-keep-ratio", "0.7", "--model-path",
               str(dyvm_dir / "checkpoint.pth"), "--eval", "--output_dir", str(dyvm_dir)) == 0
    res = json.loads((dyvm_dir / "eval.json").read_text())
    val = res["val"]
    assert val["num_images"] == 3 and val["windows_per_image"] == 4.0  # 40x40 scenes, 32 crops, stride 21
    assert val["tokens_kept_per_stage"] == [44.0, 31.0, 21.0]  # int(64 * 0.7^s)
    assert len(val["block_keep_per_layer"]) == 4 and 0 <= val["block_keep_ratio"] <= 1
    assert 0 <= val["mIoU"] <= 100 and len(val["IoU"]) == 11
    assert val["gmacs_backbone_paper"] < res["dense"]["gmacs_backbone_paper"]
    assert val["gmacs_backbone_paper"] < val["gmacs_backbone_full"]
    assert {"model", "backbone", "dense_model", "dense_backbone", "speedup_model",
            "speedup_backbone"} <= set(res["throughput"])
    assert res["throughput"]["speedup_model"] > 0
    text = capsys.readouterr().out
    assert "mIoU" in text and "paper" in text and "dense twin" in text


def test_loading_the_dense_segmenter_opens_the_gates(dense_dir, capsys, tf32_switch):
    """... and --tf32 reaches torch's process-wide switch for fp32 matmuls, as in classification."""
    assert seg("--model", "dyvm_vim_tiny", "--model-path", str(dense_dir / "checkpoint.pth"), "--eval",
               "--no-throughput", "--max-val-images", "1", "--tf32") == 0
    assert torch.backends.cuda.matmul.allow_tf32
    assert "gate heads initialised open" in capsys.readouterr().out


def test_demo_report(dense_dir, dyvm_dir, tmp_path):
    from dyvm.seg.report import build_report
    assert seg("--model", "vim_tiny", "--model-path", str(dense_dir / "checkpoint.pth"), "--eval",
               "--no-throughput", "--output_dir", str(dense_dir)) == 0
    if not (dyvm_dir / "eval.json").exists():
        assert seg("--model", "dyvm_vim_tiny", "--token-keep-ratio", "0.7", "--model-path",
                   str(dyvm_dir / "checkpoint.pth"), "--eval", "--output_dir", str(dyvm_dir)) == 0
    summary = build_report(str(dense_dir), str(dyvm_dir), str(tmp_path), wall_clock_s=1.0)
    text = (tmp_path / "report.md").read_text()
    assert "| mIoU |" in text and "figures/segmentation.png" in text
    assert (tmp_path / "figures" / "segmentation.png").stat().st_size > 10_000
    assert summary["dyvm"]["tokens_kept_per_stage"] == [44.0, 31.0, 21.0]


def test_resume_is_exact(dense_dir, tmp_path):
    """3 iterations straight == 1, resume, 2 more (DyVM with Gumbel noise, drop path, dropout, augmentation)."""
    common = ["--model", "dyvm_vim_tiny", "--token-keep-ratio", "0.7", "--model-path",
              str(dense_dir / "checkpoint.pth"), "--max-iters", "3", "--drop-path", "0.1", "--save-interval", "1"]
    assert seg(*common, "--output_dir", str(tmp_path / "straight")) == 0
    assert seg(*common, "--stop-iter", "1", "--output_dir", str(tmp_path / "split")) == 0
    assert seg(*common, "--resume", str(tmp_path / "split" / "checkpoint.pth"),
               "--output_dir", str(tmp_path / "split")) == 0
    a = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoint.pth", weights_only=False)
    assert a["iteration"] == b["iteration"] == 3
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    def last_train_line(d):
        return [json.loads(x) for x in (d / "log.txt").read_text().splitlines() if '"train_loss"' in x][-1]
    assert last_train_line(tmp_path / "straight")["train_loss"] == last_train_line(tmp_path / "split")["train_loss"]


SEG_CONFIG_DIR = os.path.join(ROOT, "configs", "seg")
SEG_CONFIGS = sorted(f for f in os.listdir(SEG_CONFIG_DIR) if f.endswith(".yaml"))


@pytest.mark.parametrize("name", SEG_CONFIGS)
def test_every_segmentation_config_builds_its_model(name):
    from dyvm.seg.config import parse_args
    from dyvm.seg.run import build_model
    args = parse_args(["--config", os.path.join(SEG_CONFIG_DIR, name)])
    with torch.device("meta"):
        model = build_model(args, 150 if args.data_set == "ADE20K" else 3)
    b = model.backbone
    if name.startswith("dyvm-vim-"):  # the paper's rows: 512 crops, 32x32 grid, layers 5/11/17/23, 80k iterations
        assert (b.cfg.grid_size, b.out_indices, b.dyvm_cfg.pruning_loc) == (32, (5, 11, 17, 23), (6, 12, 18))
        assert args.max_iters == 80000 and "80k" in name and args.layer_decay == 0.92
        assert b.keep_counts() == ([921, 829, 746] if "-t-" in name else [819, 655, 524])
    assert b.is_dynamic == ("dyvm" in name)


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet50"], "unknown model 'resnet50'"),
    (["--model", "vim_tiny", "--token-keep-ratio", "0.5"], "need a dyvm_vim"),
    (["--resume", "/nonexistent.pth"], "does not exist"),
    (["--data-set", "FOLDER", "--data-path", "/tmp"], "needs --nb-classes"),
    (["--slide-stride", "64"], "--slide-stride"),
])
def test_errors_are_one_line(argv, message, capsys):
    assert seg("--max-iters", "1", *argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
