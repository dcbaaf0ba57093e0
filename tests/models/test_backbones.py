"""VideoMamba and MambaReg: sizes and key layouts of the released models, where the class tokens sit, checkpoint
loading (resized position embeddings, a checkpoint of another family refused), option errors."""
import argparse

import pytest
import timm
import torch

import dyvm  # noqa: F401  (registers the timm names)
from dyvm.checkpoint import CheckpointError, load_checkpoint, resize_pos_embed
from dyvm.losses import build_teacher
from dyvm.models.layout import FirstClassToken, MiddleClassToken, SpreadRegisters
from dyvm.models.vim import count_parameters
from dyvm.pruning import split_cls


def meta_model(name, **kw):
    with torch.device("meta"):
        return timm.create_model(name, **kw)


PARAMS = {  # dense, DyVM student (the authors' classes, counted with their main.py settings)
    "videomamba_tiny": (7_148_008, 7_367_086), "videomamba_small": (25_796_584, 26_594_110),
    "videomamba_middle": (74_217_448, 75_989_726), "videomamba_base": (97_598_440, 100_631_134),
    "mambareg_tiny": (9_264_232, 9_483_310), "mambareg_small": (27_801_064, 28_598_590),
    "mambareg_base": (99_301_096, 102_333_790), "mambareg_large": (341_222_376, 346_740_558),
}
KEYS = {"videomamba_middle": (551, 645), "mambareg_tiny": (416, 494), "mambareg_small": (418, 496),
        "mambareg_base": (418, 496), "mambareg_large": (826, 952)}  # the others: 415 / 493, as Vim


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_and_key_counts(name):
    dense, student = meta_model(name), meta_model("dyvm_" + name)
    assert (count_parameters(dense), count_parameters(student)) == PARAMS[name]
    assert (len(dense.state_dict()), len(student.state_dict())) == KEYS.get(name, (415, 493))
    assert student.dyvm_cfg.pruning_loc == (6, 12, 18)  # also for the 32- and 48-layer models, as the authors


def _non_layer_shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("layers.")}


def test_state_dict_layouts_match_the_released_files():
    """Key names and shapes of the official files (VideoMamba: Vim's names, class entry first in pos_embed;
    MambaReg: registers, their own position embedding, neck and norm_neck)."""
    assert _non_layer_shapes(meta_model("videomamba_tiny")) == {
        "cls_token": (1, 1, 192), "pos_embed": (1, 197, 192), "patch_embed.proj.weight": (192, 3, 16, 16),
        "patch_embed.proj.bias": (192,), "head.weight": (1000, 192), "head.bias": (1000,), "norm_f.weight": (192,)}
    layer0 = {k[len("layers.0."):]: tuple(v.shape) for k, v in meta_model("videomamba_tiny").state_dict().items()
              if k.startswith("layers.0.")}
    assert layer0 == {
        "mixer.A_log": (384, 16), "mixer.D": (384,), "mixer.A_b_log": (384, 16), "mixer.D_b": (384,),
        "mixer.in_proj.weight": (768, 192), "mixer.conv1d.weight": (384, 1, 4), "mixer.conv1d.bias": (384,),
        "mixer.x_proj.weight": (44, 384), "mixer.dt_proj.weight": (384, 12), "mixer.dt_proj.bias": (384,),
        "mixer.conv1d_b.weight": (384, 1, 4), "mixer.conv1d_b.bias": (384,), "mixer.x_proj_b.weight": (44, 384),
        "mixer.dt_proj_b.weight": (384, 12), "mixer.dt_proj_b.bias": (384,), "mixer.out_proj.weight": (192, 384),
        "norm.weight": (192,)}
    for size, (d, n, neck) in {"tiny": (192, 12, None), "small": (384, 12, 192), "base": (768, 12, 192),
                               "large": (1024, 16, 128)}.items():
        head_in = n * (neck or d)
        expected = {"cls_token": (1, n, d), "pos_embed_cls": (1, n, d), "pos_embed": (1, 196, d),
                    "patch_embed.proj.weight": (d, 3, 16, 16), "patch_embed.proj.bias": (d,),
                    "head.weight": (1000, head_in), "head.bias": (1000,), "norm_f.weight": (d,)}
        if neck:
            expected.update({"neck.weight": (neck, d), "norm_neck.weight": (head_in,)})
        assert _non_layer_shapes(meta_model(f"mambareg_{size}")) == expected, size


def test_class_token_positions_of_each_layout():
    assert MiddleClassToken().positions(196) == (98,)
    assert FirstClassToken().positions(137) == (0,)
    regs = SpreadRegisters(12).positions(196)
    assert regs == tuple(range(15, 192, 16))  # sequence of 208: 15 patches before each register, 16 after the last
    assert SpreadRegisters(16).positions(196) == tuple(range(11, 192, 12))  # Large: 212 tokens
    assert SpreadRegisters(4).positions(44) == (8, 17, 26, 35)  # after a stage keeping 44 of 64
    counts = torch.tensor([44, 31, 3, 0])
    for layout in (MiddleClassToken(), FirstClassToken(), SpreadRegisters(4)):
        per_image = layout.positions(counts)
        assert per_image.shape == (4, layout.num_tokens)
        for b, c in enumerate(counts.tolist()):
            assert tuple(per_image[b].tolist()) == layout.positions(c)


def test_dense_models_place_their_class_tokens():
    x = torch.randn(2, 3, 32, 32)
    small = dict(img_size=32, patch_size=4, depth=2, embed_dim=32, num_classes=10)
    vm = timm.create_model("videomamba_tiny", **small).eval()
    assert vm.cls_positions == (0,) and vm.cfg.family == "VideoMamba" and not vm.cfg.divide_out
    mr = timm.create_model("mambareg_small", **small, num_cls_tokens=4).eval()
    assert mr.cls_positions == (12, 25, 38, 51) and mr.cfg.family == "MambaReg"
    tokens = mr.embed(x)
    patches = mr.patch_embed(x) + mr.pos_embed
    registers, others = split_cls(tokens, mr.cls_positions)
    torch.testing.assert_close(others, patches)
    torch.testing.assert_close(registers, (mr.cls_token + mr.pos_embed_cls).expand(2, -1, -1))
    with pytest.raises(ValueError, match="4 class tokens"):
        mr.cls_index
    for model in (vm, mr):
        out = model.forward_aux(x)
        assert out.logits.shape == (2, 10) and out.patch_tokens.shape == (2, 64, 32)
        assert out.seq_lens == [64 + model.cfg.num_cls_tokens] * 2
        torch.testing.assert_close(out.logits, model(x))


def test_mambareg_tiny_runs_without_a_neck():
    """The authors' MambaReg-Tiny (cls_reduce 1) cannot run their forward; here the registers go flattened into
    the head, as the official Mamba-R defines it."""
    model = timm.create_model("dyvm_mambareg_tiny", img_size=64, depth=4, embed_dim=32, num_classes=10,
                              pruning_loc=(1, 2, 3)).eval()
    assert model.neck is None and model.head.in_features == 12 * 32
    out = model.forward_aux(torch.randn(2, 3, 64, 64))  # 16 patches -> 11, 7, 5 kept
    assert out.logits.shape == (2, 10) and out.seq_lens == [28, 23, 19, 17]


@pytest.mark.parametrize("bad, message", [
    (dict(cls_position="last"), "cls_position must be one of"),
    (dict(num_cls_tokens=2), "has one class token"),
    (dict(cls_reduce=3), "cls_reduce must be a positive divisor"),
])
def test_bad_backbone_options_are_one_line_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model("videomamba_tiny", img_size=32, patch_size=4, depth=2, embed_dim=32, **bad)


SMALL = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_classes=10)


def test_pos_embed_resize_for_each_family():
    old = torch.randn(1, 1 + 16, 8)  # VideoMamba: class entry first
    new = resize_pos_embed(old, 36, lambda m: (0,))
    assert new.shape == (1, 37, 8)
    torch.testing.assert_close(new[:, 0], old[:, 0])
    torch.testing.assert_close(resize_pos_embed(new[:, 1:], 16, lambda m: ()),  # MambaReg: patches only
                               resize_pos_embed(new, 16, lambda m: (0,))[:, 1:])
    src = timm.create_model("mambareg_small", **SMALL, num_cls_tokens=4)
    model = timm.create_model("dyvm_mambareg_small", **dict(SMALL, img_size=48), num_cls_tokens=4,
                              pruning_loc=(1,), token_keep_ratios=(0.5,))
    report = load_checkpoint(model, src.state_dict())
    assert report.pos_embed_resized == (4, 6) and model.pos_embed.shape == (1, 36, 32)
    torch.testing.assert_close(model.pos_embed_cls, src.pos_embed_cls)  # registers have no grid position
    src = timm.create_model("videomamba_tiny", **SMALL)
    model = timm.create_model("videomamba_tiny", **dict(SMALL, img_size=48))
    assert load_checkpoint(model, src.state_dict()).pos_embed_resized == (4, 6)
    torch.testing.assert_close(model.pos_embed[:, 0], src.pos_embed[:, 0])
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 10)


VIM_S_ARGS = argparse.Namespace(  # what a Vim training run records
    model="vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2")


def test_a_vim_file_is_refused_by_a_videomamba(tmp_path):
    """The authors' videomamba-s.sh starts VideoMamba-S from the Vim-S file: same names and shapes, so it loads
    silently. A file that records its model refuses to load into another family."""
    vim_file = str(tmp_path / "vim_s_midclstok.pth")
    torch.save({"model": timm.create_model("vim_tiny", **SMALL).state_dict(), "args": VIM_S_ARGS}, vim_file)
    load_checkpoint(timm.create_model("dyvm_vim_tiny", **SMALL, pruning_loc=(1,)), vim_file)
    student = timm.create_model("dyvm_videomamba_tiny", **SMALL, pruning_loc=(1,))
    with pytest.raises(CheckpointError, match="trained as 'vim_small.*a Vim, but the model is a VideoMamba"):
        load_checkpoint(student, vim_file)
    with pytest.raises(CheckpointError, match="a Vim, but the model is a VideoMamba"):
        build_teacher(student.cfg, vim_file)
    videomamba_file = str(tmp_path / "videomamba_t16_in1k_res224.pth")
    src = timm.create_model("videomamba_tiny", **SMALL)
    torch.save({"model": src.state_dict(), "args": argparse.Namespace(model="videomamba_tiny")}, videomamba_file)
    assert load_checkpoint(student, videomamba_file).gates_initialised
    teacher = build_teacher(student.cfg, videomamba_file)
    assert teacher.cfg.family == "VideoMamba" and torch.equal(teacher.cls_token, src.cls_token)
    ours = {"model": src.state_dict(), "args": {"model": "MambaReg-Small"}}  # main.py records its --model
    with pytest.raises(CheckpointError, match="a MambaReg, but the model is a VideoMamba"):
        load_checkpoint(student, ours)


def test_the_authors_names_and_timm_names_resolve():
    from dyvm.models.registry import UnknownModelError, resolve

    assert resolve("VideoMamba-Middle").timm_name == "dyvm_videomamba_middle"
    assert resolve("MambaReg-Large").dense_name == "mambareg_large"
    assert resolve("dyvm_mambareg_tiny").dense_name == "mambareg_tiny" and resolve("dyvm_mambareg_tiny").dynamic
    assert resolve("videomamba_small").family.name == "VideoMamba" and not resolve("videomamba_small").dynamic
    with pytest.raises(UnknownModelError, match="unknown model 'videomamba_huge'"):
        resolve("videomamba_huge")


@pytest.mark.parametrize("name,extra", [("dyvm_videomamba_tiny", {}), ("dyvm_mambareg_small", dict(num_cls_tokens=3))])
def test_kernels_agree_with_the_reference_on_the_other_backbones(name, extra):
    """The GPU kernels (here in Triton's interpreter, about 7 s) against the reference path on VideoMamba's
    unhalved sum and MambaReg's registers: the training forward with every gradient, including the predictors',
    which reach them only through the token mask of the scans (the same code for Vim), then the eval forward."""
    import contextlib

    from mamba_ssm.ops.dispatch import triton_on_cpu

    torch.manual_seed(0)
    model = timm.create_model(name, img_size=16, patch_size=4, depth=2, embed_dim=16, num_classes=5,
                              pruning_loc=(1,), token_keep_ratios=(0.5,), gumbel_noise=False, **extra)
    x = torch.randn(2, 3, 16, 16)
    results = []
    for kernels in (False, True):
        with triton_on_cpu() if kernels else contextlib.nullcontext():
            model.train()
            out = model.forward_aux(x)
            (out.logits.square().sum() + out.patch_tokens.sum()).backward()
            model.eval()
            with torch.no_grad():
                logits = model(x)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        results.append((out.logits.detach(), logits, grads))
    (train_ref, eval_ref, grads_ref), (train_k, eval_k, grads_k) = results
    torch.testing.assert_close(train_k, train_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(eval_k, eval_ref, rtol=1e-4, atol=1e-5)
    assert set(grads_k) == set(grads_ref) and any(n.startswith("score_predictors.") for n in grads_ref)
    for n, g in grads_ref.items():
        assert (grads_k[n] - g).norm() <= 1e-4 * g.norm() + 1e-9, n
