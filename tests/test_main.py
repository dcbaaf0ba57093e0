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
from dyvm.checkpoint import recorded_teacher_path  # noqa: E402

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
    assert line["train_images_per_s"] > 0  # the epoch's training speed, also on its printed line
    assert line["train_cls_kl_loss"] > 0  # the teacher is really there
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    assert ckpt["epoch"] == 0 and not os.path.isabs(ckpt["teacher_path"])  # recorded relative to the checkpoint
    assert recorded_teacher_path(ckpt, str(out / "checkpoint.pth")) == dense_ckpt
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
    assert res["teacher"]["path"] == dense_ckpt
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
    (["--model", "vim_smal"], "unknown model 'vim_smal'; did you mean 'vim_small'?"),
    (["--model", "Vim-Tiny", "--pruning-loc", "1", "9", "2"], "pruning_loc"),
    (["--model", "Vim-Tiny"], "distils from a dense teacher"),
])
def test_bad_options_give_one_line_errors(argv, message, capsys):
    assert run(*argv, "--epochs", "1") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_eval_a_dense_checkpoint_as_dyvm_under_bf16_autocast(dense_dir, tmp_path, tf32_switch):
    """--eval of a fresh DyVM made from a dense file (raw and EMA weights), bf16 autocast (inference only);
    --tf32 reaches torch's process-wide switch for fp32 matmuls."""
    out = tmp_path / "eval"
    assert run("--model", "Vim-Tiny", "--eval", "--amp", "--tf32", "--model-path", str(dense_dir / "checkpoint.pth"),
               "--output_dir", str(out)) == 0
    assert torch.backends.cuda.matmul.allow_tf32
    res = json.loads((out / "eval.json").read_text())
    assert res["raw"]["block_keep_ratio"] == 1.0  # fresh gate heads: weight 0, bias 5 -> every direction on
    assert res["ema"]["num_images"] == res["raw"]["num_images"] == 8


@pytest.mark.parametrize("family", ["VideoMamba", "MambaReg"])
def test_other_backbones_train_with_their_dense_teacher_and_evaluate(family, tmp_path, capsys):
    """The authors' names (VideoMamba-Tiny, MambaReg-Small) build a DyVM student of that backbone, distilled from
    the dense model of the same backbone; --eval times that dense model beside it."""
    dense, student = {"VideoMamba": ("videomamba_tiny", "VideoMamba-Tiny"),
                      "MambaReg": ("mambareg_small", "MambaReg-Small")}[family]
    few = ["--epochs", "1", "--max-steps-per-epoch", "2", "--no-model-ema"]
    assert run("--model", dense, *few, "--output_dir", str(tmp_path / "dense")) == 0
    dense_ckpt = str(tmp_path / "dense" / "checkpoint.pth")
    assert run("--model", student, "--model-path", dense_ckpt, *few, "--output_dir", str(tmp_path / "dyvm")) == 0
    assert f"teacher: frozen dense {family} from {dense_ckpt}" in capsys.readouterr().out
    line = json.loads((tmp_path / "dyvm" / "log.txt").read_text())
    assert line["train_cls_kl_loss"] > 0 and line["train_token_kl_loss"] > 0
    assert run("--model", student, "--eval", "--model-path", str(tmp_path / "dyvm" / "checkpoint.pth"),
               "--output_dir", str(tmp_path / "eval")) == 0
    res = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert res["raw"]["tokens_kept_per_stage"] == [11.0, 7.0, 5.0]  # int(0.7^s * 16) of the 4x4 patches
    assert dense_ckpt in res["teacher"]["weights"] and res["teacher"]["gmacs_paper"] > res["raw"]["gmacs_paper"]


def test_a_checkpoint_of_another_backbone_is_a_one_line_error(dense_dir, capsys):
    """The authors' VideoMamba-S script starts from the Vim-S file; here that is refused."""
    assert run("--model", "VideoMamba-Tiny", "--model-path", str(dense_dir / "checkpoint.pth"), "--epochs", "1") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "'vim_tiny', a Vim, but the model is a VideoMamba" in err and "\n" not in err


@pytest.fixture(scope="module")
def dyvm_tree(dense_dir, tmp_path_factory):
    """A DyVM trained one epoch from dense_dir's checkpoint (teacher recorded relative to the checkpoint)."""
    out = tmp_path_factory.mktemp("dyvm")
    assert run("--model", "Vim-Tiny", "--model-path", str(dense_dir / "checkpoint.pth"), "--epochs", "1",
               "--max-steps-per-epoch", "1", "--output_dir", str(out)) == 0
    return out


def test_eval_when_the_recorded_teacher_moved(dense_dir, dyvm_tree, tmp_path, capsys):
    """Accuracy needs no teacher and the timing baseline is its dense twin: a missing teacher is a note."""
    import shutil
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(dyvm_tree / "checkpoint.pth", lone / "checkpoint.pth")  # the teacher is not beside it any more
    assert run("--model", "Vim-Tiny", "--eval", "--model-path", str(lone / "checkpoint.pth"),
               "--no-throughput", "--output_dir", str(lone)) == 0
    out = capsys.readouterr().out
    assert "note: teacher" in out and "not found" in out
    res = json.loads((lone / "eval.json").read_text())
    assert res["raw"]["num_images"] == 8 and "not found" in res["teacher"]["weights"]
    assert res["teacher"]["gmacs_paper"] > res["raw"]["gmacs_paper"]
    # the whole tree moved together: the relative record still finds the teacher
    moved = tmp_path / "moved"
    for d in (dense_dir, dyvm_tree):  # side by side, as they were
        moved.joinpath(d.name).mkdir(parents=True)
        shutil.copy(d / "checkpoint.pth", moved / d.name / "checkpoint.pth")
    ckpt = moved / dyvm_tree.name / "checkpoint.pth"
    assert run("--model", "Vim-Tiny", "--eval", "--model-path", str(ckpt), "--no-throughput") == 0
    assert "not found" not in capsys.readouterr().out
    assert recorded_teacher_path(torch.load(ckpt, weights_only=False), str(ckpt)) == str(
        moved / dense_dir.name / "checkpoint.pth")


def test_eval_keeps_the_training_args_and_needs_no_training_set(dyvm_tree):
    before = (dyvm_tree / "args.yaml").read_text()
    # batch 64 > the 32 training images: a training run refuses it, --eval does not need a training batch
    assert run("--model", "Vim-Tiny", "--eval", "--model-path", str(dyvm_tree / "checkpoint.pth"),
               "--batch-size", "64", "--no-throughput", "--output_dir", str(dyvm_tree)) == 0
    assert (dyvm_tree / "args.yaml").read_text() == before
    assert yaml.safe_load((dyvm_tree / "eval_args.yaml").read_text())["eval"] is True
    assert run("--model", "Vim-Tiny", "--batch-size", "64", "--epochs", "1", "--no-teacher") == 1


def test_eval_refuses_random_weights_unless_asked(capsys):
    assert run("--model", "vim_tiny", "--eval", "--no-throughput") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --eval needs trained weights") and err.count("\n") == 1
    assert run("--model", "vim_tiny", "--eval", "--no-throughput", "--allow-random-weights") == 0


@pytest.mark.parametrize("flag", ["--resume", "--model-path"])
def test_a_file_that_is_not_a_checkpoint_is_one_line(flag, tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    assert run("--model", "vim_tiny", flag, str(path), "--epochs", "1") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "notes.txt is not a checkpoint that torch.load can read" in err, err
    assert err.startswith(f"error: {flag} " if flag == "--resume" else "error: checkpoint "), err


def test_resume_restores_the_saved_options(dense_dir, tmp_path, capsys):
    """Only --resume (and the data flags of the test): the model name, epochs, ... come from the checkpoint;
    a flag given again wins and is named."""
    out = tmp_path / "run"
    assert run("--model", "vim_tiny", "--epochs", "2", "--stop-epoch", "1", "--max-steps-per-epoch", "1",
               "--output_dir", str(out)) == 0
    capsys.readouterr()
    assert run("--resume", str(out / "checkpoint.pth"), "--lr", "1e-2") == 0
    text = capsys.readouterr().out
    assert "model: vim_tiny" in text and "options restored from" in text and "--lr 0.01 (checkpoint: 0.02)" in text
    log = [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and log[1]["train_steps"] == 1  # epochs and step cap restored


def test_no_ema_column_when_the_ema_is_not_evaluated(capsys):
    assert run("--model", "vim_tiny", "--epochs", "1", "--max-steps-per-epoch", "1", "--no-eval-ema-each-epoch") == 0
    text = capsys.readouterr().out
    assert "nan" not in text and "EMA" not in text.split("epoch 0:")[1]
    # graphed steps are the default where they can run; on a CPU the default is eager steps, without a note
    assert "training steps: eager" in text and "note:" not in text
    assert " images/s), val top-1 " in text.split("epoch 0:")[1]


def test_asking_for_graphed_steps_where_they_cannot_run_says_why(capsys):
    assert run("--model", "vim_tiny", "--epochs", "1", "--max-steps-per-epoch", "1", "--no-eval-ema-each-epoch",
               "--cuda-graph-train") == 0
    text = capsys.readouterr().out
    assert "note: a CUDA-graph training step needs a CUDA device; training steps run eagerly" in text


@pytest.mark.parametrize("variable, value, message", [
    ("MAMBA_SCAN_CKPT_CHUNK", "12", "the scan's checkpoint interval must be one of 8, 16, 32 (steps)"),
    ("MAMBA_REBUILD_SCAN_INPUTS", "on", "must be 1 (recompute the scan's inputs in the backward), 0 (keep them) or "
                                        "unset")])
def test_a_bad_kernel_setting_is_one_line_before_any_work(monkeypatch, capsys, variable, value, message):
    monkeypatch.setenv(variable, value)
    assert run("--model", "vim_tiny", "--epochs", "1", "--max-steps-per-epoch", "1") == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == f"error: {variable}={value}: {message}", captured.err
    assert "data:" not in captured.out


def test_a_flag_typo_is_one_line_with_a_hint(capsys):
    with pytest.raises(SystemExit) as exit_:
        run("--tokn-keep-ratio", "0.5")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unrecognized arguments: --tokn-keep-ratio 0.5" in err
    assert "did you mean --token-keep-ratio?" in err


def test_under_torchrun_only_rank_0_says_a_shared_error(monkeypatch, capsys):
    """Every process meets the same bad option: one line in all, from rank 0 (exit status 1 everywhere)."""
    for rank, lines in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        assert run("--model", "vim_smal") == 1
        assert capsys.readouterr().err.count("error: unknown model") == lines
    from dyvm.cli import says_error
    nonfinite = harness.NonFiniteLossError
    monkeypatch.setenv("RANK", "1")  # a non-finite loss is said by the process that found it
    assert says_error(nonfinite("non-finite loss at epoch 0 step 3: module 'layers.2'"))
    assert not says_error(nonfinite("non-finite loss at epoch 0 step 3: in another process"))
