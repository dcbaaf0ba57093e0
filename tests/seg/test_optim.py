"""Layer-wise lr decay groups and the poly schedule with linear warm-up (against hand-computed values)."""
import pytest
import torch

from dyvm.seg.optim import PolySchedule, build_optimizer, layer_id, param_groups
from dyvm.seg.segmentor import build_segmentor


@pytest.fixture(scope="module")
def model():
    return build_segmentor("dyvm_vim_tiny", num_classes=3, img_size=32, patch_size=8, depth=4, embed_dim=16,
                           d_state=4, decode_channels=8, aux_channels=8, token_keep_ratio=0.7)


def test_layer_ids():
    assert layer_id("backbone.pos_embed", 24) == 0
    assert layer_id("backbone.patch_embed.proj.weight", 24) == 0
    assert layer_id("backbone.layers.0.mixer.in_proj.weight", 24) == 1
    assert layer_id("backbone.layers.23.mixer.block_head.bias", 24) == 24
    assert layer_id("backbone.score_predictors.0.in_conv.1.weight", 24) == 25
    assert layer_id("decode_head.classifier.1.weight", 24) == 25


def test_groups_scale_and_decay(model):
    groups = param_groups(model, weight_decay=0.01, layer_decay=0.5)
    where = {n: g for g in groups for n in g["names"]}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert where["decode_head.classifier.1.weight"]["lr_scale"] == 1.0  # depth 4: heads have id 5
    assert where["backbone.layers.3.mixer.in_proj.weight"]["lr_scale"] == 0.5
    assert where["backbone.layers.0.mixer.in_proj.weight"]["lr_scale"] == 0.5 ** 4
    assert where["backbone.pos_embed"]["lr_scale"] == 0.5 ** 5
    assert where["backbone.pos_embed"]["weight_decay"] == 0.0
    assert where["backbone.layers.0.norm.weight"]["weight_decay"] == 0.0
    assert where["backbone.layers.0.mixer.dt_proj.bias"]["weight_decay"] == 0.0
    assert where["backbone.layers.0.mixer.A_log"]["weight_decay"] == 0.01  # 2-D: decays, as the authors'
    assert where["backbone.layers.0.mixer.in_proj.weight"]["weight_decay"] == 0.01


def test_poly_schedule_with_linear_warmup(model):
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.01, layer_decay=0.5)
    sched = PolySchedule(opt, max_iters=100, power=1.0, warmup_iters=10, warmup_ratio=1e-6)
    heads = [g for g in opt.param_groups if g["lr_scale"] == 1.0][0]
    embed = [g for g in opt.param_groups if g["layer_id"] == 0][0]
    sched.step(0)
    assert heads["lr"] == pytest.approx(1e-3 * 1e-6)  # the warm-up starts at warmup_ratio
    sched.step(5)
    assert heads["lr"] == pytest.approx(1e-3 * 0.95 * (1 - (1 - 1e-6) * 0.5))
    assert embed["lr"] == pytest.approx(heads["lr"] * 0.5 ** 5)
    sched.step(10)
    assert heads["lr"] == pytest.approx(1e-3 * 0.9)  # warm-up over: plain poly
    sched.step(100)
    assert heads["lr"] == 0.0
    s2 = PolySchedule(opt, max_iters=100, power=2.0, min_lr=1e-5)
    s2.step(50)
    assert heads["lr"] == pytest.approx((1e-3 - 1e-5) * 0.25 + 1e-5)
    assert isinstance(opt, torch.optim.AdamW)
