"""DyVM model: sizes, the train/inference equivalence the method rests on, gradients, ablation options."""
import pytest
import timm
import torch
import torch.nn as nn
from timm.loss import SoftTargetCrossEntropy

import dyvm  # noqa: F401  (registers the timm names)
from dyvm.benchmark import calibrate_gates
from dyvm.losses import DyVMLoss
from dyvm.models.dyvm import DyVM, ForwardOutput
from dyvm.models.mixer import reset_gate_head
from dyvm.models.vim import count_parameters
from dyvm.pruning import LearnedSelection, indices_to_mask, split_cls, straight_through

TINY = dict(img_size=32, patch_size=4, depth=4, embed_dim=32, num_classes=10, pruning_loc=(1, 2, 3))
M = 64  # patches of TINY


def tiny(**options) -> DyVM:
    return timm.create_model("dyvm_vim_tiny", **{**TINY, **options})


def test_parameter_counts_of_the_registered_sizes():
    expected = {"tiny": 7_367_086, "small": 26_594_110, "base": 100_631_134}
    for size, count in expected.items():
        model = timm.create_model(f"dyvm_vim_{size}")
        assert count_parameters(model) == count, size
        assert len(model.score_predictors) == 3 and model.dyvm_cfg.pruning_loc == (6, 12, 18)
        del model


def test_keep_ratios_and_counts():
    model = tiny(token_keep_ratio=0.8)
    assert model.dyvm_cfg.token_keep_ratios == pytest.approx((0.8, 0.64, 0.512))
    assert model.keep_counts() == [51, 40, 32]
    model.eval()
    out = model.forward_aux(torch.randn(2, 3, 32, 32))
    assert out.seq_lens == [M + 1, 52, 41, 33]
    assert out.patch_tokens.shape == (2, 32, 32) and out.slot_to_patch.shape == (2, 32)


@pytest.mark.parametrize("bad, message", [
    (dict(pruning="magic"), "pruning must be one of"),
    (dict(predictor_input="ssm_C"), "predictor_input must be one of"),
    (dict(pruning_loc=(2, 1, 3)), "strictly increasing"),
    (dict(pruning_loc=(0, 1, 2)), "strictly increasing"),
    (dict(token_keep_ratios=(0.5, 0.7, 0.2)), "non-increasing"),
    (dict(token_keep_ratios=(0.5, 0.2)), "same length"),
    (dict(token_keep_ratio=0.5, token_keep_ratios=(0.5, 0.25, 0.1)), "not both"),
])
def test_bad_options_raise_one_line_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        tiny(**bad)


def test_misspelt_option_is_refused():
    with pytest.raises(TypeError, match="unknown"):
        tiny(token_keep_ratoi=0.5)


def test_forward_returns_logits_and_the_same_output_type_in_both_modes():
    model = tiny()
    x = torch.randn(3, 3, 32, 32)
    for training in (True, False):
        model.train(training)
        out = model.forward_aux(x)
        assert isinstance(out, ForwardOutput)
        assert model(x).shape == (3, 10)
        assert out.gates.shape == (4, 3, 2) and len(out.decisions) == 3
        assert all(d.shape == (3, M) for d in out.decisions)
        assert out.final_policy.shape == out.patch_tokens.shape[:2] + (1,)


def test_dense_vim_forward_aux():
    model = timm.create_model("vim_tiny", **{k: v for k, v in TINY.items() if k != "pruning_loc"}).eval()
    x = torch.randn(2, 3, 32, 32)
    out = model.forward_aux(x)
    torch.testing.assert_close(out.logits, model(x))
    assert out.patch_tokens.shape == (2, M, 32) and out.final_policy.eq(1).all()
    assert torch.equal(out.slot_to_patch, torch.arange(M).expand(2, M))
    assert out.decisions == [] and out.gates is None and out.seq_lens == [M + 1] * 4


class TopKInTraining(LearnedSelection):
    """Training decisions made like the inference ones (top-k of the keep score), still straight-through:
    the same decisions in both modes, so the two forward paths must agree."""

    def train_keep(self, log_probs, policy, k):
        score = log_probs[..., 0].masked_fill(policy <= 0.5, float("-inf"))
        hard = indices_to_mask(score.topk(k, dim=1).indices, policy.shape[1])
        return straight_through(hard, log_probs[..., 0].exp()) * policy


def _spread_gates(model, seed=0):
    """Gate heads that switch directions off for some images and on for others; decisive predictors (the
    fresh ones score every token about equally, and near-ties would make top-k depend on rounding)."""
    g = torch.Generator().manual_seed(seed)
    for predictor in model.score_predictors or []:
        for linear in (predictor.in_conv[1], predictor.out_conv[0], predictor.out_conv[2], predictor.out_conv[4]):
            with torch.no_grad():
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=g) / linear.in_features ** 0.5)
    for layer in model.layers:
        head = layer.mixer.block_head
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.3)
            head.bias.copy_(torch.tensor([0.3, -0.3]))


@pytest.mark.parametrize("predictor_input", ["residual", "ssm_B", "ssm_delta"])
def test_training_and_inference_paths_agree_for_the_same_decisions(predictor_input):
    torch.manual_seed(1)
    _check_training_and_inference_agree(tiny(gumbel_noise=False, predictor_input=predictor_input))


# The other backbones at the TINY size: VideoMamba's class token first; MambaReg with 4 registers and a neck.
BACKBONES = {"videomamba": ("dyvm_videomamba_tiny", {}),
             "mambareg": ("dyvm_mambareg_small", dict(num_cls_tokens=4, cls_reduce=2))}


def tiny_backbone(family, **options) -> DyVM:
    name, extra = BACKBONES[family]
    return timm.create_model(name, **{**TINY, **extra, **options})


@pytest.mark.parametrize("predictor_input", ["residual", "ssm_B"])
@pytest.mark.parametrize("family", sorted(BACKBONES))
def test_training_and_inference_paths_agree_on_every_backbone(family, predictor_input):
    """The masked full-length training forward (class token / registers placed per image from its kept count)
    equals the gathered inference forward for the same decisions, on VideoMamba and MambaReg too."""
    torch.manual_seed(1)
    model = tiny_backbone(family, gumbel_noise=False, predictor_input=predictor_input)
    _spread_gates(model)
    # Gate biases set layer by layer so that each direction runs for some images and not others. (VideoMamba's
    # first class token sees the image only through backward scans: with fixed random biases all of them can be
    # off, and then every image gets the same decisions.)
    calibrate_gates(model, 0.5, batch_size=16, img_size=32, in_chans=3, device="cpu", seed=1)
    _check_training_and_inference_agree(model, spread=False)


def _check_training_and_inference_agree(model, spread=True):
    if spread:
        _spread_gates(model)
    model.selection = TopKInTraining()
    x = torch.randn(6, 3, 32, 32)
    model.train()
    train = model.forward_aux(x)
    model.eval()
    with torch.no_grad():
        infer = model.forward_aux(x)
    n = model.cfg.num_cls_tokens
    assert train.seq_lens == [M + n] * 4 and infer.seq_lens == [M + n, 44 + n, 31 + n, 21 + n]
    gates = infer.gates
    assert torch.equal(train.gates.detach(), gates)
    assert (gates == 0).any() and (gates == 1).any()
    assert ((gates.sum(1) > 0) & (gates.sum(1) < 6)).any()  # some layer-direction differs between images
    for t, i in zip(train.decisions, infer.decisions):  # straight-through values are 0/1 up to rounding
        torch.testing.assert_close(t.detach(), i)
        assert torch.equal((t > 0.5).float(), i)
    k = infer.patch_tokens.shape[1]
    torch.testing.assert_close(train.final_policy[:, :k], torch.ones(6, k, 1))
    assert torch.equal(train.final_policy[:, k:], torch.zeros(6, M - k, 1))
    assert torch.equal(train.slot_to_patch[:, :k], infer.slot_to_patch)
    torch.testing.assert_close(train.logits.detach(), infer.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(train.patch_tokens[:, :k].detach(), infer.patch_tokens, rtol=1e-5, atol=1e-5)


def test_gradient_reaches_every_predictor_and_gate_parameter():
    model = tiny()
    _spread_gates(model)
    teacher = timm.create_model("vim_tiny", **{k: v for k, v in TINY.items() if k != "pruning_loc"})
    loss_fn = DyVMLoss(SoftTargetCrossEntropy(), teacher, model.dyvm_cfg.token_keep_ratios, 0.8)
    x = torch.randn(4, 3, 32, 32)
    target = torch.softmax(torch.randn(4, 10), -1)
    model.train()
    loss, _ = loss_fn(x, model.forward_aux(x), target)
    loss.backward()
    heads = [(n, p) for n, p in model.named_parameters() if "score_predictors" in n or "block_head" in n]
    assert len(heads) == 3 * 10 + 4 * 2
    for name, p in heads:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in teacher.parameters())


def _names(model):
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_ablation_options_change_only_their_part():
    full = _names(tiny())
    backbone = {n: s for n, s in full.items() if "score_predictors" not in n and "block_head" not in n}
    gates = {n: s for n, s in full.items() if "block_head" in n}
    predictors = {n: s for n, s in full.items() if "score_predictors" in n}
    assert _names(tiny(block_selection=False)) == {**backbone, **predictors}
    assert _names(tiny(pruning="none")) == {**backbone, **gates}
    assert _names(tiny(pruning="random")) == {**backbone, **gates}
    assert _names(tiny(pruning="static")) == {**backbone, **gates}
    ssm_b = _names(tiny(predictor_input="ssm_B"))
    assert ssm_b["score_predictors.0.in_conv.1.weight"] == (16, 16)
    assert _names(tiny(predictor_input="ssm_delta"))["score_predictors.0.in_conv.1.weight"] == (64, 64)
    assert {n: s for n, s in ssm_b.items() if "score_predictors" not in n} == {**backbone, **gates}


def test_block_selection_off_means_no_gates_and_token_pruning_still_on():
    model = tiny(block_selection=False)
    x = torch.randn(2, 3, 32, 32)
    for training in (True, False):
        model.train(training)
        out = model.forward_aux(x)
        assert out.gates is None and len(out.decisions) == 3


def test_pruning_none_keeps_every_token_and_still_gates():
    model = tiny(pruning="none").eval()
    out = model.forward_aux(torch.randn(2, 3, 32, 32))
    assert out.decisions == [] and out.seq_lens == [M + 1] * 4 and out.gates.shape == (4, 2, 2)


@pytest.mark.parametrize("pruning", ["random", "static"])
def test_random_and_static_keep_exact_nested_counts_in_both_modes(pruning):
    model = tiny(pruning=pruning, block_selection=False)
    x = torch.randn(5, 3, 32, 32)
    counts = model.keep_counts()
    for training in (True, False):
        model.train(training)
        out = model.forward_aux(x)
        previous = torch.ones(5, M)
        for d, k in zip(out.decisions, counts):
            assert d.sum(1).tolist() == [k] * 5
            assert (d <= previous).all()  # cumulative: a pruned patch never comes back
            previous = d
        if pruning == "static":
            assert (out.decisions[-1] == out.decisions[-1][0]).all()  # the same patches for every image
    if pruning == "static":
        model.train()
        train = model.forward_aux(x)
        model.eval()
        infer = model.forward_aux(x)
        for t, i in zip(train.decisions, infer.decisions):
            assert torch.equal(t, i)


def test_gates_start_open():
    model = tiny()
    for layer in model.layers:
        assert layer.mixer.block_head.weight.eq(0).all() and layer.mixer.block_head.bias.eq(5).all()
    model.eval()
    assert model.forward_aux(torch.randn(2, 3, 32, 32)).gates.eq(1).all()


def test_eval_forward_has_no_gradient_graph_requirements():
    model = tiny().eval()
    with torch.no_grad():
        out = model.forward_aux(torch.randn(2, 3, 32, 32))
    assert isinstance(model.selection, LearnedSelection) and not out.logits.requires_grad
    assert isinstance(model.score_predictors, nn.ModuleList)


def _copy_shared(src, dst):
    """Copy every parameter the two models share by name."""
    dst_state = dst.state_dict()
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if k in dst_state}, strict=False)


@pytest.mark.parametrize("training", [False, True])
def test_block_selection_only_with_open_gates_is_the_dense_vim(training):
    model = tiny(pruning="none", gumbel_noise=False).train(training)  # fresh gates: weight 0, bias 5 -> all open
    dense = timm.create_model("vim_tiny", **{k: v for k, v in TINY.items() if k != "pruning_loc"}).train(training)
    _copy_shared(model, dense)
    x = torch.randn(3, 3, 32, 32)
    out = model.forward_aux(x)
    assert out.gates.detach().eq(1).all()
    torch.testing.assert_close(out.logits, dense(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [False, True])
def test_token_pruning_only_equals_dyvm_with_open_gates(training):
    full = tiny(gumbel_noise=False)
    _spread_gates(full)  # decisive predictors
    for layer in full.layers:  # back to open gates
        reset_gate_head(layer.mixer.block_head)
    token_only = tiny(gumbel_noise=False, block_selection=False)
    _copy_shared(full, token_only)
    full.train(training), token_only.train(training)
    x = torch.randn(3, 3, 32, 32)
    a, b = full.forward_aux(x), token_only.forward_aux(x)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    for d1, d2 in zip(a.decisions, b.decisions):
        assert torch.equal(d1, d2)


@pytest.mark.parametrize("options", [dict(pruning="random"), dict(pruning="static"), dict(pruning="none"),
                                     dict(block_selection=False)])
@pytest.mark.parametrize("family", sorted(BACKBONES))
def test_ablation_options_on_every_backbone(family, options):
    """The ablations are options of the shared code, so they hold for VideoMamba and MambaReg as for Vim: exact,
    nested keep counts for the rules without a predictor, gates only with block selection."""
    model = tiny_backbone(family, **options)
    x = torch.randn(3, 3, 32, 32)
    for training in (True, False):
        model.train(training)
        out = model.forward_aux(x)
        assert out.logits.shape == (3, 10) and torch.isfinite(out.logits).all()
        assert (out.gates is None) == (not model.dyvm_cfg.block_selection)
        assert len(out.decisions) == model.dyvm_cfg.num_stages
        if options.get("pruning") in ("random", "static"):
            for d, k in zip(out.decisions, model.keep_counts()):
                assert d.sum(1).tolist() == [k] * 3
def test_predictor_input_changes_what_the_predictor_reads_and_its_scores():
    """--predictor-input is live: on one batch and one backbone, the residual stream, the previous layer's SSM B
    and its raw delta reach the first predictor as different features and give different keep scores.
    (Equal early losses of the two SSM ablations are no sign of a bug: freshly initialised predictors score
    every token about alike, so the Gumbel noise alone decides, and the hard decisions' loss is the same.)"""
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(3)
    backbone = {k: v for k, v in tiny(block_selection=False).state_dict().items() if "score_predictors" not in k}
    seen = {}
    for kind in ("residual", "ssm_B", "ssm_delta"):
        model = tiny(block_selection=False, predictor_input=kind).eval()
        model.load_state_dict(backbone, strict=False)
        _spread_predictors(model, seed=0)  # the same seed for every kind: only the input differs
        hook = model.score_predictors[0].register_forward_hook(
            lambda m, inputs, out: seen.update({kind: (inputs[0].detach(), out.detach())}) and None)
        with torch.no_grad():
            model.forward_aux(x)
            if kind != "residual":  # what layer 0's SSM computes, the stage before layer 1 reads it
                mixer = model.layers[0].mixer
                xz = mixer.in_proj_xz(model.layers[0].add_norm(model.embed(x), None)[0])
                expected = split_cls(mixer.ssm_feature(xz, kind), M // 2)[1]
                torch.testing.assert_close(seen[kind][0], expected)
        hook.remove()
    widths = {k: f.shape[-1] for k, (f, _) in seen.items()}
    assert widths == {"residual": 32, "ssm_B": 16, "ssm_delta": 64}  # embed_dim, d_state, d_inner
    scores = {k: out[..., 0] for k, (_, out) in seen.items()}  # log p(keep), (B, M)
    for a, b in (("residual", "ssm_B"), ("residual", "ssm_delta"), ("ssm_B", "ssm_delta")):
        assert (scores[a] - scores[b]).abs().max() > 1e-3, (a, b)
    assert seen["ssm_B"][0].std() > 0 and seen["ssm_delta"][0].std() > 0


def _spread_predictors(model, seed):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.score_predictors.named_parameters():
        if p.dim() == 2:  # Linear weights of a useful scale (the init's 0.02 makes every score alike)
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


@pytest.mark.parametrize("predictor_input", ["residual", "ssm_B"])  # (ssm_B: the predictor reads masked x too)
def test_training_linears_over_the_kept_tokens_only_change_nothing(monkeypatch, predictor_input):
    """With the scans over the kept tokens, the mixers' fp32 Linear layers on the tf32x3 kernel compute only each
    image's kept and class tokens and the conv's reach past them (dyvm.models.dyvm.LINEAR_KEPT_ONLY): the same loss
    and gradients as over every row (here the kernel runs in the interpreter, whose matmuls round by tile)."""
    import dyvm.models.dyvm as dyvm_module
    from mamba_ssm.ops import linear_fp32
    from mamba_ssm.ops.triton import linear_tf32x3

    monkeypatch.setattr(linear_fp32, "MIN_ROWS", 8)
    monkeypatch.setattr(linear_fp32, "ENABLED", True)
    monkeypatch.setattr(linear_fp32, "triton_enabled", lambda x, module: True)  # the linears only
    live_counts, kernel = [], linear_tf32x3.linear_tf32x3
    model = tiny(predictor_input=predictor_input)
    mixer = model.layers[0].mixer  # in_proj's and out_proj's weights, and their transposes (the input gradients)
    mixer_weights = {tuple(s) for m in (mixer.in_proj, mixer.out_proj) for s in (m.weight.shape, m.weight.t().shape)}

    def counted(x, w_hi, *args, live_rows=None, **kwargs):
        # in_proj and out_proj (x_proj's two directions come stacked, 4-D; the predictors' Linears take the kernel
        # too, over every row)
        if x.dim() == 3 and tuple(w_hi.shape) in mixer_weights:
            live_counts.append(None if live_rows is None else live_rows[1].item())
        return kernel(x, w_hi, *args, live_rows=live_rows, **kwargs)

    monkeypatch.setattr(linear_tf32x3, "linear_tf32x3", counted)
    _spread_gates(model)
    x = torch.randn(4, 3, 32, 32)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    results = []
    for kept_only in (False, True):
        monkeypatch.setattr(dyvm_module, "LINEAR_KEPT_ONLY", kept_only)
        live_counts.clear()
        torch.manual_seed(3)  # the same Gumbel draws
        out = model.forward_aux(x)
        loss = out.logits.square().mean() + out.patch_tokens.square().mean() + out.gates.mean()
        results.append([loss, *torch.autograd.grad(loss, params)])
    # 4 layers x (in_proj, out_proj) forward and backward; the first layer's whole rows, then 3 stages' live rows
    assert len(live_counts) == 16 and live_counts.count(None) == 4
    assert all(n is not None and n < 4 * (M + 1) for n in live_counts[2:14]) and min(live_counts[2:14]) > 0
    for a, b in zip(*results):  # (the floor: a gradient of 1e-4 rounds by tile in the interpreter too)
        assert ((a - b).norm() <= 1e-6 * b.norm() + 1e-9) and torch.isfinite(a).all()


def test_training_scans_over_the_kept_tokens_only_change_nothing(monkeypatch):
    """After a pruning stage the training scans walk each image's kept tokens only (dyvm.models.dyvm.SCAN_KEPT_ONLY;
    the pruned ones sit masked behind them): the same loss and the same gradient for every parameter as scans over
    the whole sequence, to rounding (the PyTorch implementation stops its walks after the longest image, and its
    sums over the shorter sequence round otherwise)."""
    import dyvm.models.dyvm as dyvm_module

    model = tiny()
    _spread_gates(model)
    teacher = timm.create_model("vim_tiny", **{k: v for k, v in TINY.items() if k != "pruning_loc"})
    loss_fn = DyVMLoss(SoftTargetCrossEntropy(), teacher, model.dyvm_cfg.token_keep_ratios, 0.8)
    x, target = torch.randn(4, 3, 32, 32), torch.softmax(torch.randn(4, 10), -1)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    results, lengths, mix = [], [], dyvm_module.DynamicMamba.mix
    monkeypatch.setattr(dyvm_module.DynamicMamba, "mix",
                        lambda self, *a, **kw: lengths.append(kw.get("lengths")) or mix(self, *a, **kw))
    for kept_only in (False, True):
        monkeypatch.setattr(dyvm_module, "SCAN_KEPT_ONLY", kept_only)
        torch.manual_seed(3)  # the same Gumbel draws
        loss, _ = loss_fn(x, model.forward_aux(x), target)
        results.append([loss, *torch.autograd.grad(loss, params)])
    with_lengths = [n for n in lengths[4:] if n is not None]
    assert lengths[:4] == [None] * 4 and len(with_lengths) == 3 and (with_lengths[-1] < M + 1).all()
    for a, b in zip(*results):
        assert ((a - b).norm() <= 1e-6 * b.norm()) and torch.isfinite(a).all()
