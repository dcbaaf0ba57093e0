"""main.py end to end on tiny models and synthetic data: train, outputs, resume exactness, --eval, errors."""
import json
import os
import sys

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main as harness  # noqa: E402

TINY = ["--data-set", "SYNTHETIC", "--synthetic-size", "32", "--input-size", "32", "--patch-size", "8",
        "--depth", "4", "--embed-dim", "32", "--batch-size", "8", "--num_workers", "0", "--no-progress",
        "--warmup-epochs", "1", "--lr", "2e-2", "--throughput-batch-size", "4", "--throughput-iters", "2"]
LOSS_TERMS = ["cls_loss", "token_pruning_loss", "block_pruning_loss", "cls_kl_loss", "token_kl_loss"]


def run(*argv):
    return harness.main([*TINY, *argv])


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dense")
    assert run("--model", "vim_tiny", "--epochs", "1", "--output_dir", str(out)) == 0
    return out


def test_dense_training_outputs(dense_dir):
    for name in ("checkpoint.pth", "best_checkpoint.pth", "log.txt", "args.yaml"):
        assert (dense_dir / name).is_file(), name
    assert any(p.name.startswith("events.out.tfevents") for p in (dense_dir / "tensorboard").iterdir())
    ckpt = torch.load(dense_dir / "checkpoint.pth", weights_only=False)
    assert {"model", "optimizer", "lr_scheduler", "scaler", "model_ema", "epoch", "args", "teacher_path"} <= set(ckpt)
    args = yaml.safe_load((dense_dir / "args.yaml").read_text())
    assert args["model"] == "vim_tiny" and args["embed_dim"] == 32


def test_dyvm_training_logs_every_loss_term_then_resume_and_eval(dense_dir, tmp_path, capsys):
    out = tmp_path / "dyvm"
    dense_ckpt = str(dense_dir / "checkpoint.pth")
    assert run("--model", "Vim-Tiny", "--model-path", dense_ckpt, "--epochs", "2", "--stop-epoch", "1",
               "--output_dir", str(out)) == 0
    line = json.loads((out / "log.txt").read_text().splitlines()[0])
    for term in LOSS_TERMS + ["loss", "lr", "block_keep_ratio"]:
        assert f"train_{term}" in line, term
    assert line["train_cls_kl_loss"] > 0  # the teacher is really there
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    assert ckpt["teacher_path"] == dense_ckpt and ckpt["epoch"] == 0
    # resume: the teacher comes from the stored dense path, not from the DyVM checkpoint
    assert run("--model", "Vim-Tiny", "--epochs", "2", "--resume", str(out / "checkpoint.pth"),
               "--output_dir", str(out)) == 0
    assert "teacher: frozen dense Vim from " + dense_ckpt in capsys.readouterr().out
    assert len((out / "log.txt").read_text().splitlines()) == 2
    assert run("--model", "Vim-Tiny", "--eval", "--model-path", str(out / "checkpoint.pth"),
               "--output_dir", str(tmp_path / "eval")) == 0
    res = json.loads((tmp_path / "eval" / "eval.json").read_text())
    raw = res["raw"]
    assert {"acc1", "acc5", "gmacs_paper", "gmacs_full", "tokens_kept_per_stage", "block_keep_ratio",
            "block_keep_per_layer"} <= set(raw) and "ema" in res
    assert raw["tokens_kept_per_stage"] == [11.0, 7.0, 5.0]  # int(16 * 0.7^s)
    assert len(raw["block_keep_per_layer"]) == 4
    assert res["teacher"]["weights"] == dense_ckpt
    assert res["throughput"]["images_per_s"] > 0 and res["teacher"]["throughput"]["images_per_s"] > 0
    assert "throughput_cuda_graph" not in res  # CUDA-graph timing is for GPUs (run there by main.py --eval)
    assert raw["gmacs_paper"] < res["teacher"]["gmacs_paper"]
    text = capsys.readouterr().out
    assert "paper convention" in text and "images/s" in text and "(EMA)" in text


def test_resume_is_exact(dense_dir, tmp_path):
    """2 epochs x 2 steps straight == 1 epoch, resume, 1 epoch (DyVM with Gumbel noise, mixup, EMA, teacher)."""
    common = ["--model", "Vim-Tiny", "--model-path", str(dense_dir / "checkpoint.pth"), "--epochs", "2",
              "--max-steps-per-epoch", "2", "--drop-path", "0.1", "--model-ema-decay", "0.9"]
    assert run(*common, "--output_dir", str(tmp_path / "straight")) == 0
    assert run(*common, "--stop-epoch", "1", "--output_dir", str(tmp_path / "split")) == 0
    assert run(*common, "--resume", str(tmp_path / "split" / "checkpoint.pth"),
               "--output_dir", str(tmp_path / "split")) == 0
    a = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoint.pth", weights_only=False)
    assert a["epoch"] == b["epoch"] == 1 and a["global_step"] == b["global_step"] == 4
    for key in ("model", "model_ema"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), f"{key}.{name}"
    moved = [n for n, t in a["model"].items() if t.is_floating_point() and
             not torch.equal(t, torch.load(dense_dir / "checkpoint.pth", weights_only=False)["model"].get(n, t))]
    assert moved  # training did change the weights
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    straight = [json.loads(x) for x in (tmp_path / "straight" / "log.txt").read_text().splitlines()]
    split = [json.loads(x) for x in (tmp_path / "split" / "log.txt").read_text().splitlines()]
    assert [r["train_loss"] for r in straight] == [r["train_loss"] for r in split]


def test_nonfinite_loss_names_the_first_module(dense_dir, tmp_path, capsys):
    state = torch.load(dense_dir / "checkpoint.pth", weights_only=False)["model"]
    blown = dict(state)
    blown["layers.2.mixer.in_proj.weight"] = state["layers.2.mixer.in_proj.weight"] * 1e36  # finite, overflows
    path = tmp_path / "blown.pth"
    torch.save(blown, path)
    assert run("--model", "vim_tiny", "--model-path", str(path), "--epochs", "1", "--no-model-ema") == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "non-finite loss" in err and "module 'layers.2" in err, err
    nan = dict(state)
    nan["head.weight"] = torch.full_like(state["head.weight"], float("nan"))
    torch.save(nan, path)
    assert run("--model", "vim_tiny", "--model-path", str(path), "--epochs", "1") == 1
    assert "non-finite parameter(s): head.weight" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--token-keep-ratio", "1.5"], "--token-keep-ratio must be in (0, 1], got 1.5"),
    (["--block-keep-ratio", "-0.1"], "--block-keep-ratio must be in [0, 1], got -0.1"),
    (["--token-keep-ratios", "0.5", "0.7", "0.3"], "--token-keep-ratios must be non-increasing"),
    (["--model-path", "/nonexistent/vim.pth"], "--model-path /nonexistent/vim.pth does not exist"),
    (["--model", "resnet50"], "unknown model 'resnet50'"),
    (["--model", "Vim-Tiny", "--pruning-loc", "1", "9", "2"], "pruning_loc"),
    (["--model", "Vim-Tiny"], "distils from a dense teacher"),
])
def test_bad_options_give_one_line_errors(argv, message, capsys):
    assert run(*argv, "--epochs", "1") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_config_file_defaults_and_overrides(tmp_path):
    from dyvm.config import ConfigError, parse_args
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: Vim-Small\ntoken_keep_ratio: 0.8\nblock-keep-ratio: 0.6\nepochs: 3\n")
    args = parse_args(["--config", str(cfg), "--epochs", "5"])
    assert (args.model, args.token_keep_ratio, args.block_keep_ratio, args.epochs) == ("Vim-Small", 0.8, 0.6, 5)
    cfg.write_text("tokn_keep_ratio: 0.8\n")
    with pytest.raises(ConfigError, match="unknown option.*tokn_keep_ratio"):
        parse_args(["--config", str(cfg)])


CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
CONFIGS = sorted(os.path.relpath(os.path.join(d, f), CONFIG_DIR) for d, _, files in os.walk(CONFIG_DIR)
                 for f in files if f.endswith(".yaml") and not os.path.relpath(d, CONFIG_DIR).startswith("seg"))
# (configs/seg/ holds `main.py seg` configs: tests/test_seg_main.py builds those)


def test_configs_cover_every_table_row_and_ablation():
    assert {"vim-t.yaml", "vim-s.yaml", "vim-b.yaml", "demo-dense.yaml", "demo-dyvm.yaml"} <= set(CONFIGS)
    assert {f"ablations/{a}.yaml" for a in ("token-only", "block-only", "random", "static", "predictor-b",
                                            "predictor-delta")} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_builds_its_model(name):
    """Each table-row / ablation / demo config parses and builds the intended model (on the meta device)."""
    from dyvm.config import parse_args
    from dyvm.engine import build_model
    args = parse_args(["--config", os.path.join(CONFIG_DIR, name)])
    with torch.device("meta"):
        model = harness.build_model(args, 1000 if args.data_set == "IMNET" else 10)
    assert build_model is harness.build_model
    dyvm_cfg = getattr(model, "dyvm_cfg", None)
    if "ablations" in name:
        stem = name.split("/")[1][:-5]
        expect = {"token-only": ("learned", False), "block-only": ("none", True), "random": ("random", False),
                  "static": ("static", False), "predictor-b": ("learned", False),
                  "predictor-delta": ("learned", False)}[stem]
        assert (dyvm_cfg.pruning, dyvm_cfg.block_selection) == expect
    if name in ("vim-t.yaml", "vim-s.yaml", "vim-b.yaml"):
        params = {"vim-t.yaml": 7_367_086, "vim-s.yaml": 26_594_110, "vim-b.yaml": 100_631_134}[name]
        assert sum(p.numel() for p in model.parameters()) == params
        assert dyvm_cfg.pruning_loc == (6, 12, 18)


def test_eval_a_dense_checkpoint_as_dyvm_under_bf16_autocast(dense_dir, tmp_path):
    """--eval of a fresh DyVM made from a dense file (raw and EMA weights), bf16 autocast (inference only)."""
    out = tmp_path / "eval"
    assert run("--model", "Vim-Tiny", "--eval", "--amp", "--model-path", str(dense_dir / "checkpoint.pth"),
               "--output_dir", str(out)) == 0
    res = json.loads((out / "eval.json").read_text())
    assert res["raw"]["block_keep_ratio"] == 1.0  # fresh gate heads: weight 0, bias 5 -> every direction on
    assert res["ema"]["num_images"] == res["raw"]["num_images"] == 8
