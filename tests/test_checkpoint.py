"""Checkpoint loading and saving: official Vim layout, DyVM layout (ours = the authors'), wrappers, prefixes,
position-embedding interpolation, clear errors, gate initialisation only for a DyVM fresh from a dense Vim."""
import argparse
import os

import pytest
import timm
import torch

import dyvm  # noqa: F401  (registers the timm names)
from dyvm.checkpoint import (CheckpointError, load_checkpoint, load_state_dict_file, resize_pos_embed,
                             save_checkpoint)
from dyvm.losses import build_teacher

VIM = dict(img_size=32, patch_size=8, depth=4, embed_dim=32, num_classes=10)
DYVM = dict(VIM, pruning_loc=(1, 2, 3))


def dense(**kw):
    return timm.create_model("vim_tiny", **{**VIM, **kw})


def dynamic(**kw):
    return timm.create_model("dyvm_vim_tiny", **{**DYVM, **kw})


def _same_backbone(a, b):
    sb = b.state_dict()
    for k, v in a.state_dict().items():
        if "score_predictors" not in k and "block_head" not in k:
            assert torch.equal(v, sb[k]), k


def test_official_vim_file_into_dense_and_dyvm(tmp_path):
    src = dense()
    path = str(tmp_path / "vim_t_midclstok.pth")
    torch.save({"model": src.state_dict(), "args": argparse.Namespace(lr=1e-3), "epoch": 3}, path)
    target = dense()
    report = load_checkpoint(target, path)
    assert report.source == "dense" and not report.gates_initialised
    _same_backbone(src, target)

    model = dynamic()
    with torch.no_grad():  # pretend the gates had been trained, to see the init being applied
        for layer in model.layers:
            layer.mixer.block_head.bias.fill_(-1.0)
    report = load_checkpoint(model, path)
    _same_backbone(src, model)
    assert report.gates_initialised and "weight 0 / bias 5" in report.summary()
    assert len(report.missing_dyvm_heads) == 4 * 2 + 3 * 10
    for layer in model.layers:
        assert layer.mixer.block_head.weight.eq(0).all() and layer.mixer.block_head.bias.eq(5).all()


def test_dyvm_round_trip_keeps_trained_gates(tmp_path):
    src = dynamic()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = str(tmp_path / "checkpoint.pth")
    save_checkpoint({"model": src.state_dict(), "model_ema": dense().state_dict(), "epoch": 1}, path)
    model = dynamic()
    report = load_checkpoint(model, path)
    assert report.source == "dyvm" and not report.gates_initialised and not report.missing_dyvm_heads
    for (k, v), w in zip(src.state_dict().items(), model.state_dict().values()):
        assert torch.equal(v, w), k
    x = torch.randn(2, 3, 32, 32)
    src.eval(), model.eval()
    torch.testing.assert_close(src(x), model(x))
    # model_ema on request (here the EMA entry is a dense model: the DyVM heads are then fresh)
    ema_report = load_checkpoint(dynamic(), path, use_ema=True)
    assert ema_report.source == "dense" and ema_report.gates_initialised


def test_authors_layout_with_module_prefix_and_dead_keys():
    src = dynamic()
    authors = {"module." + k: v for k, v in src.state_dict().items()}
    authors["module.layers.0.layer_head.weight"] = torch.zeros(1, 32)  # unused head in the authors' Token_Only
    model = dynamic()
    report = load_checkpoint(model, {"model": authors})
    assert report.ignored_keys == ["layers.0.layer_head.weight"]
    for (k, v), w in zip(src.state_dict().items(), model.state_dict().values()):
        assert torch.equal(v, w), k


def test_dyvm_file_into_dense_or_ablations_ignores_only_dyvm_heads():
    src = dynamic()
    report = load_checkpoint(dense(), src.state_dict())
    assert report.source == "dyvm" and len(report.ignored_keys) == 4 * 2 + 3 * 10
    report = load_checkpoint(dynamic(pruning="random"), src.state_dict())
    assert all(k.startswith("score_predictors.") for k in report.ignored_keys) and not report.gates_initialised


def test_errors_count_the_keys_and_show_one_of_each_kind():
    sd = dense().state_dict()
    del sd["norm_f.weight"], sd["layers.1.mixer.D_b"]
    sd["layers.9.mixer.in_proj.weight"] = torch.zeros(1)
    sd["head.weight"] = torch.zeros(1000, 32)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(dense(), sd)
    message = str(err.value)
    assert "\n" not in message
    assert "4 tensor(s) differ (2 missing, 1 unexpected, 1 of another shape)" in message, message
    for key in ("missing layers.1.mixer.D_b", "unexpected layers.9.mixer.in_proj.weight",
                "shape head.weight (1000, 32)"):  # one of each kind, three in all
        assert key in message


def test_incomplete_dyvm_heads_are_an_error():
    sd = dynamic().state_dict()
    del sd["layers.2.mixer.block_head.bias"], sd["score_predictors.1.out_conv.4.weight"]
    with pytest.raises(CheckpointError, match="layers.2.mixer.block_head.bias.*score_predictors.1.out_conv.4.weight|"
                                              "score_predictors.1.out_conv.4.weight.*layers.2.mixer.block_head.bias"):
        load_checkpoint(dynamic(), sd)


def test_pos_embed_resize_keeps_the_middle_class_token():
    d = 3
    old = torch.randn(1, 16 + 1, d)  # 4x4 grid, class entry at 8
    new = resize_pos_embed(old, 64)  # 8x8 grid, class entry at 32
    assert new.shape == (1, 65, d)
    torch.testing.assert_close(new[:, 32], old[:, 8])
    # a constant grid stays constant: the class entry was not mixed into the patches
    const = torch.cat([torch.ones(1, 8, d), torch.full((1, 1, d), 7.0), torch.ones(1, 8, d)], dim=1)
    resized = resize_pos_embed(const, 36)
    torch.testing.assert_close(resized[:, 18], torch.full((1, d), 7.0))
    torch.testing.assert_close(torch.cat([resized[:, :18], resized[:, 19:]], 1), torch.ones(1, 36, d))
    # same size: the identity
    torch.testing.assert_close(resize_pos_embed(old, 16), old)


def test_loading_at_another_image_size_interpolates():
    src = dense()
    model = dense(img_size=48)
    report = load_checkpoint(model, src.state_dict())
    assert report.pos_embed_resized == (4, 6)
    torch.testing.assert_close(model.pos_embed[:, 18], src.pos_embed[:, 8])


def test_load_state_dict_file_errors(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pth does not exist"):
        load_state_dict_file(str(tmp_path / "nope.pth"))
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="notes.txt is not a checkpoint that torch.load can read") as err:
        load_state_dict_file(str(text))
    assert "\n" not in str(err.value)
    path = str(tmp_path / "odd.pth")
    torch.save({"model": {"a": 1}}, path)
    with pytest.raises(CheckpointError, match="state dict"):
        load_state_dict_file(path)
    torch.save({"model": dense().state_dict()}, path)
    with pytest.raises(CheckpointError, match="model_ema"):
        load_state_dict_file(path, use_ema=True)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = str(tmp_path / "sub" / "ckpt.pth")
    save_checkpoint({"x": torch.ones(2)}, path)
    save_checkpoint({"x": torch.zeros(2)}, path)  # overwrite in place
    assert torch.equal(torch.load(path)["x"], torch.zeros(2))
    assert os.listdir(tmp_path / "sub") == ["ckpt.pth"]

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        save_checkpoint({"x": Unpicklable()}, path)
    assert os.listdir(tmp_path / "sub") == ["ckpt.pth"]
    assert torch.equal(torch.load(path)["x"], torch.zeros(2))  # the old file survives a failed save


def test_build_teacher_is_frozen_dense_and_refuses_a_dyvm_file(tmp_path):
    src = dense()
    path = str(tmp_path / "vim.pth")
    torch.save({"model": src.state_dict()}, path)
    teacher = build_teacher(dynamic().cfg, path)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    _same_backbone(src, teacher)
    dyvm_path = str(tmp_path / "dyvm.pth")
    torch.save({"model": dynamic().state_dict()}, dyvm_path)
    with pytest.raises(CheckpointError, match="original dense Vim"):
        build_teacher(dynamic().cfg, dyvm_path)


def test_a_wrong_size_checkpoint_is_one_short_line():
    """Counts the tensors that differ, shows three, and names the likely cause (another model width)."""
    wide = dense(embed_dim=64)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(dense(), wide.state_dict())
    msg = str(err.value)
    n_shapes = sum(1 for k, v in wide.state_dict().items() if v.shape != dense().state_dict()[k].shape)
    assert f"{n_shapes} tensor(s) differ ({n_shapes} of another shape)" in msg
    assert msg.count("shape ") == 3 and "\n" not in msg and len(msg) < 500, msg
    assert "width 64, this one is 32" in msg
