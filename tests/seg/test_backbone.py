"""Segmentation backbone: feature maps, the train/inference equivalence with restored tokens, frozen features,
gradients, gate pooling."""
import pytest
import torch

from dyvm.models.dyvm import make_dyvm_config
from dyvm.models.vim import VimConfig
from dyvm.pruning import LearnedSelection, indices_to_mask, straight_through
from dyvm.seg.backbone import DENSE, SegBackbone, default_out_indices, pooled_gate_input

CFG = VimConfig(img_size=32, patch_size=4, depth=4, embed_dim=32, d_state=8)  # 8x8 grid
M, G = 64, 8


def dyvm_backbone(feature_source="mixer", **options) -> SegBackbone:
    options = {"pruning_loc": (1, 2, 3), "token_keep_ratio": 0.7, "gumbel_noise": False, **options}
    return SegBackbone(CFG, make_dyvm_config(**options), out_indices=(0, 1, 2, 3), feature_source=feature_source)


class TopKInTraining(LearnedSelection):
    """Training decisions made like the inference ones (top-k of the keep score), straight-through."""

    def train_keep(self, log_probs, policy, k):
        score = log_probs[..., 0].masked_fill(policy <= 0.5, float("-inf"))
        hard = indices_to_mask(score.topk(k, dim=1).indices, policy.shape[1])
        return straight_through(hard, log_probs[..., 0].exp()) * policy


def decisive(model: SegBackbone, seed: int = 0) -> SegBackbone:
    """Predictors that separate tokens clearly (no near-ties in top-k) and gates that differ between images."""
    g = torch.Generator().manual_seed(seed)
    for predictor in model.score_predictors:
        for linear in (predictor.in_conv[1], predictor.out_conv[0], predictor.out_conv[2], predictor.out_conv[4]):
            with torch.no_grad():
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=g) / linear.in_features ** 0.5)
    for layer in model.layers:
        with torch.no_grad():
            layer.mixer.block_head.weight.copy_(torch.randn(layer.mixer.block_head.weight.shape, generator=g))
            layer.mixer.block_head.bias.copy_(torch.tensor([0.2, -0.2]))
    model.selection = TopKInTraining()
    return model


@pytest.fixture(scope="module", params=["mixer", "stream"])
def paths(request):
    """The same model and images through the training and the inference forward (features: mixer outputs, the
    authors' choice, or the residual stream)."""
    torch.manual_seed(3)
    model = decisive(dyvm_backbone(request.param))
    x = torch.randn(6, 3, 32, 32)
    model.train()
    train = model(x)
    model.eval()
    with torch.no_grad():
        infer = model(x)
    return model, x, train, infer


def test_default_out_indices():
    assert default_out_indices(24) == (5, 11, 17, 23)
    assert default_out_indices(12) == (2, 5, 8, 11)
    assert default_out_indices(4) == (0, 1, 2, 3)


def test_dense_backbone_shapes_and_state_dict():
    model = SegBackbone(CFG, DENSE).eval()
    out = model(torch.randn(2, 3, 32, 32))
    assert [tuple(f.shape) for f in out.features] == [(2, 32, G, G)] * 4
    assert out.decisions == [] and out.gates is None and out.seq_lens == [M] * 4
    keys = set(model.state_dict())
    assert model.state_dict()["pos_embed"].shape == (1, M, 32)
    assert not any(k.startswith(("cls_token", "head", "norm_f", "score_predictors")) or "block_head" in k
                   for k in keys)


def test_training_and_inference_give_the_same_feature_maps_for_the_same_decisions(paths):
    model, _, train, infer = paths
    assert train.seq_lens == [M] * 4 and infer.seq_lens == [M, 44, 31, 21]  # int(64 * 0.7^s)
    assert (infer.gates == 0).any() and (infer.gates == 1).any()
    assert torch.equal(train.gates.detach(), infer.gates)
    for t, i in zip(train.decisions, infer.decisions):
        assert torch.equal((t.detach() > 0.5).float(), i)
    for t, i in zip(train.features, infer.features):
        assert t.shape == i.shape == (6, 32, G, G)
        torch.testing.assert_close(t.detach(), i, rtol=1e-5, atol=1e-5)


def test_dropped_tokens_keep_their_features_frozen(paths):
    """A patch dropped at stage s shows, in every later map, the feature it had in the map just before s."""
    model, _, train, infer = paths
    for out in (train, infer):
        feats = [f.detach().flatten(2) for f in out.features]  # (B, D, M); out index i is layer i here
        for s, decision in enumerate(out.decisions):
            dropped = decision.detach() < 0.5  # (B, M): gone after stage s (cumulative)
            before = feats[s]  # the map of the layer just before the stage prunes (pruning_loc = s + 1)
            for later in feats[s + 1:]:
                assert torch.equal(later.transpose(1, 2)[dropped], before.transpose(1, 2)[dropped])
            kept = ~dropped
            assert not torch.allclose(feats[s + 1].transpose(1, 2)[kept], before.transpose(1, 2)[kept])


def test_gradients_reach_predictors_gates_and_backbone():
    """(Seeded: a layer's direction gets no gradient where the Gumbel draws turn it off for every image.)"""
    torch.manual_seed(0)
    model = dyvm_backbone(gumbel_noise=True)
    decisive(model).selection = LearnedSelection(gumbel_noise=True)
    model.train()
    out = model(torch.randn(6, 3, 32, 32))
    loss = sum(f.square().mean() for f in out.features) + sum(d.mean() for d in out.decisions) + out.gates.mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _same_both_ways(monkeypatch, flag: str):
    """A DyVM backbone's training feature maps and gradients (Gumbel noise, the same draws) with
    dyvm.models.dyvm.<flag> off and on: the same, to rounding."""
    import dyvm.models.dyvm as dyvm_model

    model = dyvm_backbone(gumbel_noise=True)
    decisive(model).selection = LearnedSelection(gumbel_noise=True)
    model.train()
    x, params, results = torch.randn(3, 3, 32, 32), list(model.parameters()), []
    for on in (False, True):
        monkeypatch.setattr(dyvm_model, flag, on)
        torch.manual_seed(5)
        out = model(x)
        loss = sum(f.square().mean() for f in out.features) + sum(d.mean() for d in out.decisions) + out.gates.mean()
        results.append([*out.features, *torch.autograd.grad(loss, params)])
    for a, b in zip(*results):
        assert (a - b).norm() <= 1e-6 * b.norm()


def test_training_scans_over_the_kept_tokens_only_change_nothing(monkeypatch):
    """The training scans stop at each image's last kept token (dyvm.models.dyvm.SCAN_KEPT_ONLY): the same feature
    maps and gradients, to rounding, as scans over the whole sequence (the maps read no pruned slot's output)."""
    from dyvm.models.mixer import DynamicMamba

    lengths, mix = [], DynamicMamba.mix
    monkeypatch.setattr(DynamicMamba, "mix",
                        lambda self, *a, **kw: lengths.append(kw.get("lengths")) or mix(self, *a, **kw))
    _same_both_ways(monkeypatch, "SCAN_KEPT_ONLY")
    assert lengths[:4] == [None] * 4 and lengths[4] is None and (lengths[-1] < M).all()


def test_training_linears_over_the_kept_tokens_only_change_nothing(monkeypatch):
    """The mixers' fp32 out_proj on the tf32x3 kernel computes only each image's kept rows and the conv's reach past
    them (dyvm.models.dyvm.LINEAR_KEPT_ONLY; in_proj every row, see the backbone's _Tokens): the same feature maps
    and gradients."""
    from mamba_ssm.ops import linear_fp32

    monkeypatch.setattr(linear_fp32, "MIN_ROWS", 8)
    monkeypatch.setattr(linear_fp32, "ENABLED", True)
    monkeypatch.setattr(linear_fp32, "triton_enabled", lambda x, module: True)  # the linears only (interpreter)
    maps, row_map = [], linear_fp32.LiveRows.row_map
    monkeypatch.setattr(linear_fp32.LiveRows, "row_map", lambda self, *a: maps.append(a) or row_map(self, *a))
    _same_both_ways(monkeypatch, "LINEAR_KEPT_ONLY")
    assert maps and all(a == (M, 3) for a in maps)  # (L, the conv's reach)


def test_gate_pooling_is_the_mean_over_kept_tokens():
    xz = torch.randn(2, 6, 5)
    mask = torch.tensor([[1.0, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    pooled = pooled_gate_input(xz, mask)
    torch.testing.assert_close(pooled[0], xz[0, :, :2].mean(-1))
    torch.testing.assert_close(pooled[1], xz[1, :, :4].mean(-1))
    torch.testing.assert_close(pooled_gate_input(xz, None), xz.mean(-1))


def test_bad_options_are_one_line_errors():
    with pytest.raises(ValueError, match="out_indices"):
        SegBackbone(CFG, DENSE, out_indices=(2, 1))
    with pytest.raises(ValueError, match="feature_source"):
        SegBackbone(CFG, DENSE, feature_source="norm")
    with pytest.raises(ValueError, match="residual"):
        SegBackbone(CFG, make_dyvm_config(pruning_loc=(1, 2, 3), predictor_input="ssm_B"))
