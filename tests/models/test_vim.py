"""The Vim backbone: shapes, exact parameter counts, the released checkpoint layout, gradients."""
import pytest
import timm
import torch

import dyvm  # noqa: F401  (registers the timm names)
from dyvm.models.vim import VIM_SMALL, Vim, count_parameters
from mamba_ssm import Mamba

TINY = dict(img_size=32, patch_size=8, depth=3, embed_dim=32, num_classes=7)


@pytest.mark.parametrize("name,expected", [("vim_tiny", 7_148_008), ("vim_small", 25_796_584),
                                           ("vim_base", 97_598_440)])
def test_parameter_counts_match_the_paper_models_exactly(name, expected):
    with torch.device("meta"):  # counting needs shapes only
        model = timm.create_model(name)
    assert count_parameters(model) == expected


def released_vim_small_keys():
    """The key list and shapes of vim_s_midclstok_80p5acc.pth (docs/reference.md, section 1)."""
    D, Di, R, N = 384, 768, 24, 16
    keys = {"cls_token": (1, 1, D), "pos_embed": (1, 197, D), "patch_embed.proj.weight": (D, 3, 16, 16),
            "patch_embed.proj.bias": (D,), "head.weight": (1000, D), "head.bias": (1000,), "norm_f.weight": (D,)}
    for i in range(24):
        p = f"layers.{i}."
        keys.update({p + "norm.weight": (D,), p + "mixer.in_proj.weight": (2 * Di, D),
                     p + "mixer.out_proj.weight": (D, Di)})
        for sfx in ("", "_b"):
            keys.update({p + f"mixer.conv1d{sfx}.weight": (Di, 1, 4), p + f"mixer.conv1d{sfx}.bias": (Di,),
                         p + f"mixer.x_proj{sfx}.weight": (R + 2 * N, Di), p + f"mixer.dt_proj{sfx}.weight": (Di, R),
                         p + f"mixer.dt_proj{sfx}.bias": (Di,), p + f"mixer.D{sfx}": (Di,)})
        keys[p + "mixer.A_log"] = (Di, N)
        keys[p + "mixer.A_b_log"] = (Di, N)
    return keys


def test_released_vim_checkpoint_layout_loads_with_no_missing_or_unexpected_key():
    with torch.device("meta"):
        model = timm.create_model("vim_small")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == released_vim_small_keys()


def test_state_dict_round_trip_reproduces_the_outputs():
    a = timm.create_model("vim_tiny", **TINY).eval()
    b = timm.create_model("vim_tiny", **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    b.load_state_dict({"model": a.state_dict()}["model"], strict=True)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_forward_shapes_and_class_token_position():
    model = timm.create_model("vim_tiny", **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits, patches = model.forward_with_tokens(x)
    assert feats.shape == (2, 17, 32) and logits.shape == (2, 7) and patches.shape == (2, 16, 32)
    assert model.cls_index == 8
    torch.testing.assert_close(logits, model.head(feats[:, 8]))
    # The class token sits at M//2 before the position embedding is added.
    tokens = model.embed(x)
    torch.testing.assert_close(tokens[:, 8], (model.cls_token + model.pos_embed[:, 8])[0].expand(2, -1))


def test_every_parameter_receives_a_gradient():
    model = timm.create_model("vim_tiny", **TINY, drop_path_rate=0.1).train()
    model(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_drop_path_schedule_matches_vim():
    model = timm.create_model("vim_tiny", **TINY, drop_path_rate=0.2)
    rates = [getattr(layer.drop_path, "drop_prob", 0.0) for layer in model.layers]
    assert rates == pytest.approx([0.0, 0.0, 0.1])  # ([0] + linspace(0, rate, depth))[i]
    assert model.drop_path.drop_prob == pytest.approx(0.2)


def test_mixer_is_vims_bidirectional_mamba_with_halved_sum():
    model = timm.create_model("vim_tiny", **TINY)
    mixer = model.layers[0].mixer
    assert isinstance(mixer, Mamba) and mixer.bimamba_type == "v2" and mixer.if_divide_out
    assert mixer.dt_rank == 2 and mixer.d_inner == 64
    assert mixer.A_log.dtype == torch.float32 and getattr(mixer.A_log, "_no_weight_decay", False)


def test_plain_mamba_layer_and_upstream_constructor_arguments():
    m = Mamba(16, d_state=8, expand=2, use_fast_path=True, layer_idx=0)
    x = torch.randn(2, 5, 16)
    assert m(x).shape == x.shape
    scaled = Mamba(16, bimamba_type="v2", init_layer_scale=0.5)
    assert scaled.gamma.shape == (16,)
    with pytest.raises(ValueError, match="bimamba_type"):
        Mamba(16, bimamba_type="v3")
    with pytest.raises(NotImplementedError, match="inference_params"):
        m(x, inference_params=object())


def test_bad_options_and_inputs_get_clear_errors():
    with pytest.raises(TypeError, match="unknown Vim option"):
        timm.create_model("vim_tiny", if_devide_out=True)  # the misspelling Vim's Base config carried
    with pytest.raises(ValueError, match="download"):
        timm.create_model("vim_tiny", pretrained=True)
    model = timm.create_model("vim_tiny", **TINY)
    with pytest.raises(ValueError, match="set img_size"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        Vim(VIM_SMALL.updated(img_size=30))


def test_patch_embedding_matmul_equals_the_strided_conv():
    """PatchEmbed runs its Conv2d as a matrix product over the patches: same values and gradients as the
    conv itself (fresh random weights and images, RGB and one-channel patch sizes)."""
    from dyvm.models.vim import PatchEmbed

    for img, patch, chans, dim in ((64, 16, 3, 24), (28, 4, 1, 8)):
        embed = PatchEmbed(img, patch, chans, dim)
        x = torch.randn(2, chans, img, img, requires_grad=True)
        got = embed(x)
        want = embed.proj(x).flatten(2).transpose(1, 2)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(got)
        params = [x, embed.proj.weight, embed.proj.bias]
        for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="in_chans"):
        embed(torch.randn(1, 3, 28, 28))
