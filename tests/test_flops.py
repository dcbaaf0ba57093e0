"""FLOPs (MACs) counts: the published dense numbers, a hand count, counts from what a DyVM actually ran."""
import math
import os

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import dyvm  # noqa: F401
from dyvm.flops import macs_from_output, main as flops_main, nominal_macs

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def meta_model(name, **kw):
    with torch.device("meta"):
        return timm.create_model(name, **kw)


def hand_count(L_per_layer, D, N=16, K=4, directions=2.0, classes=1000, patches=196, patch=16, chans=3):
    """Independent closed form (docs/reference.md section 4), both conventions, one image."""
    Di, R = 2 * D, math.ceil(D / 16)
    paper = full = patches * D * chans * patch * patch + D * classes
    for L in L_per_layer:
        shared = L * D * 2 * Di + L * Di * D
        one_dir = (L + K - 1) * Di * K + L * Di * (R + 2 * N) + L * R * Di + 9 * L * Di * N + 2 * L * Di
        paper += shared + one_dir * directions / 2
        full += shared + one_dir * directions
    return paper, full


@pytest.mark.parametrize("name,D,published", [("vim_tiny", 192, 1.449), ("vim_small", 384, 5.077),
                                              ("vim_base", 768, 18.868)])
def test_dense_paper_convention_matches_published(name, D, published):
    paper, full = nominal_macs(meta_model(name))
    assert round(paper / 1e9, 3) == published
    want_paper, want_full = hand_count([197] * 24, D)
    assert paper == want_paper and full == want_full
    assert full > paper  # both directions counted


def test_dyvm_small_closed_form():
    """DyVM-S at r=0.7: lengths 197x6, 138x6, 97x6, 68x6; predictors on 196/137/96 tokens; block ratio 0.8."""
    model = meta_model("dyvm_vim_small", token_keep_ratio=0.7)
    paper, full = nominal_macs(model, block_keep_ratio=0.8)
    lens = [197] * 6 + [138] * 6 + [97] * 6 + [68] * 6
    want_paper, want_full = hand_count(lens, 384, directions=1.6)
    D = 384
    predictor_per_token = D * D + D * (D // 2) + (D // 2) * (D // 4) + (D // 4) * 2
    predictors = predictor_per_token * (196 + 137 + 96)
    gate_heads = 24 * 2 * 768 * 2  # counted in the full convention only
    assert paper == pytest.approx(want_paper + predictors, rel=1e-12)
    assert full == pytest.approx(want_full + predictors + gate_heads, rel=1e-12)
    assert abs(paper / 1e9 - 3.239) < 1e-3  # 2.654 + 0.1029 + 0.0578 + 0.0004 + 0.8 * 0.530


def tiny_dyvm(**kw):
    torch.manual_seed(0)
    return timm.create_model("dyvm_vim_tiny", img_size=32, patch_size=4, depth=4, embed_dim=32, num_classes=10,
                             pruning_loc=(1, 2, 3), token_keep_ratio=0.7, **kw).eval()


def test_counts_follow_what_each_image_ran():
    model = tiny_dyvm()
    torch.manual_seed(1)
    for layer in model.layers:  # gates that differ per image
        torch.nn.init.normal_(layer.mixer.block_head.weight, std=0.5)
        torch.nn.init.zeros_(layer.mixer.block_head.bias)
    with torch.no_grad():
        out = model.forward_aux(torch.randn(6, 3, 32, 32))
    paper, full = macs_from_output(model, out)
    assert out.seq_lens == [65, 45, 32, 22]  # 64 patches -> 44, 31, 21 kept, plus the class token
    dirs = (out.gates > 0.5).sum(-1).double()  # (depth, B)
    assert dirs.unique().numel() > 1
    for b in range(6):
        want_paper = want_full = 64 * 32 * 3 * 16 + 32 * 10
        per_token = 32 * 32 + 32 * 16 + 16 * 8 + 8 * 2
        want_paper += per_token * (64 + 44 + 31)
        want_full += per_token * (64 + 44 + 31) + 4 * 128 * 2  # gate heads: Linear(2 * d_inner, 2) per layer
        for i, L in enumerate(out.seq_lens):
            shared = L * 32 * 128 + L * 64 * 32
            one = (L + 3) * 64 * 4 + L * 64 * (2 + 32) + L * 2 * 64 + 9 * L * 64 * 16 + 2 * L * 64
            want_paper += shared + one * float(dirs[i, b]) / 2
            want_full += shared + one * float(dirs[i, b])
        assert float(paper[b]) == pytest.approx(want_paper, rel=1e-12)
        assert float(full[b]) == pytest.approx(want_full, rel=1e-12)


def test_predictor_and_outside_counts_agree_with_torch_flop_counter():
    """Cross-check the Linear/conv terms outside the mixers with torch.utils.flop_counter (2 FLOPs per MAC)."""
    model = tiny_dyvm()
    x = torch.randn(2, 3, 32, 32)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        out = model.forward_aux(x)
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}  # keyed by module class
    per_token = sum(m.in_features * m.out_features for m in model.score_predictors[0].modules()
                    if isinstance(m, torch.nn.Linear))
    batch = 2
    assert counts["TokenScorePredictor"] == 2 * batch * per_token * (64 + 44 + 31)
    assert counts["PatchEmbed"] == 2 * batch * 64 * 32 * 3 * 16
    projections = sum(L * (32 * 128 + 64 * 32) for L in out.seq_lens)  # in_proj + out_proj at each length
    assert counts["Linear"] == 2 * batch * (32 * 10 + 4 * 128 * 2 + projections)  # + head + gate heads
    assert out.logits.shape == (2, 10)


def test_cli_prints_both_conventions(capsys):
    assert flops_main(["--model", "vim_small"]) == 0
    text = capsys.readouterr().out
    assert "5.077 G (paper convention" in text and "5.912 G (full" in text
    assert flops_main(["--model", "Vim-Small", "--block-keep-ratio", "0.8"]) == 0
    text = capsys.readouterr().out
    assert "dyvm_vim_small" in text and "3.239 G (paper convention" in text and "[137, 96, 67]" in text
    assert "vim_small at 224x224: 25,796,584 parameters" in text and "5.077 G (paper" in text  # and the dense one
    assert flops_main(["--model", "resnet50"]) == 2
    assert "unknown model" in capsys.readouterr().err


# ---- VideoMamba and MambaReg ---------------------------------------------------------------------------------
# Paper convention; the authors' get_flops on their own models gives these (dense, and DyVM with every direction
# run and at the block ratio of their scripts).

@pytest.mark.parametrize("name,published", [
    ("videomamba_tiny", 1.449), ("videomamba_small", 5.077), ("videomamba_middle", 14.481),
    ("videomamba_base", 18.868), ("mambareg_small", 5.360), ("mambareg_base", 19.918), ("mambareg_large", 70.642)])
def test_dense_other_backbones_match_the_authors_count(name, published):
    model = meta_model(name)
    paper, full = nominal_macs(model)
    assert round(paper / 1e9, 3) == published
    cfg = model.cfg
    n = cfg.num_cls_tokens
    want_paper, want_full = hand_count([196 + n] * cfg.depth, cfg.embed_dim)
    head_and_neck = model.head.in_features * 1000 - cfg.embed_dim * 1000  # hand_count has a head on one token
    if model.neck is not None:  # MambaReg's neck, a Linear on each register
        head_and_neck += n * cfg.embed_dim * (cfg.embed_dim // cfg.cls_reduce)
    assert paper == want_paper + head_and_neck and full == want_full + head_and_neck


@pytest.mark.parametrize("name,ratio,all_on,block_ratio,at_target", [
    ("videomamba_tiny", 0.9, 1.279, 0.8, 1.215), ("videomamba_small", 0.7, 3.345, 0.8, 3.239),
    ("videomamba_middle", 0.7, 8.411, 0.7, 8.100), ("videomamba_base", 0.7, 12.426, 0.7, 12.042),
    ("mambareg_small", 0.7, 3.628, 0.8, 3.513), ("mambareg_base", 0.7, 13.476, 0.7, 13.058),
    ("mambareg_large", 0.7, 37.960, 0.7, 36.941)])
def test_dyvm_other_backbones_match_the_authors_count(name, ratio, all_on, block_ratio, at_target):
    model = meta_model("dyvm_" + name, token_keep_ratio=ratio)
    assert round(nominal_macs(model, 1.0)[0] / 1e9, 3) == all_on
    assert round(nominal_macs(model, block_ratio)[0] / 1e9, 3) == at_target


@pytest.mark.parametrize("name,extra", [("dyvm_vim_tiny", {}), ("dyvm_videomamba_tiny", {}),
                                        ("dyvm_mambareg_small", dict(num_cls_tokens=4, cls_reduce=2))])
def test_counts_from_what_ran_equal_the_nominal_count_with_every_gate_open(name, extra):
    """Fresh gates run every direction: the per-image count must equal the nominal one, whatever the number of
    class tokens (which count in every layer's length but are never scored by a predictor)."""
    model = timm.create_model(name, img_size=32, patch_size=4, depth=4, embed_dim=32, num_classes=10,
                              pruning_loc=(1, 2, 3), token_keep_ratio=0.7, **extra).eval()
    with torch.no_grad():
        out = model.forward_aux(torch.randn(2, 3, 32, 32))
    n = model.cfg.num_cls_tokens
    assert out.seq_lens == [64 + n, 44 + n, 31 + n, 21 + n]
    paper, full = macs_from_output(model, out)
    nominal = nominal_macs(model, 1.0)
    assert paper.tolist() == [nominal[0]] * 2 and full.tolist() == [nominal[1]] * 2


def test_cli_takes_the_authors_names_of_the_other_backbones(capsys):
    assert flops_main(["--model", "MambaReg-Small", "--block-keep-ratio", "0.8"]) == 0
    text = capsys.readouterr().out
    assert "mambareg_small at 224x224: 27,801,064 parameters" in text and "5.360 G (paper" in text
    assert "dyvm_mambareg_small" in text and "3.513 G (paper" in text
    assert flops_main(["--model", "dyvm_videomamba_tiny", "--token-keep-ratio", "0.9",
                       "--block-keep-ratio", "0.8"]) == 0
    text = capsys.readouterr().out
    assert "7,367,086 parameters" in text and "1.215 G (paper" in text and "[176, 158, 142]" in text


@pytest.mark.parametrize("argv,message", [
    (["--model", "vim_smal"], "unknown model 'vim_smal'; did you mean 'vim_small'?"),
    (["--model", "dyvm_vim_small", "--block-keep-ratio", "-1"], "--block-keep-ratio must be in [0, 1], got -1.0"),
    (["--model", "dyvm_vim_small", "--block-keep-ratio", "1.5"], "--block-keep-ratio must be in [0, 1], got 1.5"),
    (["--model", "Vim-Small", "--token-keep-ratio", "0"], "--token-keep-ratio must be in (0, 1], got 0.0"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    """The flops CLI applies the same keep-ratio rule as main.py and prints no MAC count for a bad value."""
    assert flops_main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err == f"error: {err[7:]}" and message in err and "\n" not in err, err
    assert "MACs" not in captured.out


@pytest.mark.parametrize("name", ["vim_tiny", "dyvm_vim_tiny"])
def test_torch_flop_counter_matches_the_full_count_on_cpu(name):
    """On CPU the scan and the conv run as the same custom ops as on a GPU, so torch's FlopCounterMode sees them
    with their formulas and counts exactly 2x dyvm.flops' full convention (the norms, activations, gathers and
    the scan's elementwise work are outside both counts). Fresh DyVM gates are open: every direction runs,
    as the op's count assumes (it cannot see the gates)."""
    torch.manual_seed(0)
    kw = dict(pruning_loc=(1, 2, 3), token_keep_ratio=0.7) if name.startswith("dyvm") else {}
    model = timm.create_model(name, img_size=32, patch_size=4, depth=4, embed_dim=32, num_classes=10, **kw).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        out = model.forward_aux(torch.randn(3, 3, 32, 32))
    _, full = macs_from_output(model, out)
    assert out.gates is None or bool((out.gates > 0.5).all())
    ops = {str(k) for k in counter.get_flop_counts()["Global"]}
    assert {"mamba_ssm.scan_fwd", "causal_conv1d.conv_fwd"} <= ops
    assert counter.get_total_flops() == 2 * int(full.sum())
