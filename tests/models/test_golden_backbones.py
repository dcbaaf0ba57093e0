"""DyVM on VideoMamba and MambaReg against the authors' own code for those backbones (tests/golden, see its README).

One golden file per backbone holds a dense pass, an eval pass and a training pass (Gumbel noise off) with one set
of weights. Each file is loaded and each pass run once per module (fixtures); the tests compare what they need.
"""
import pytest
import timm
import torch
from timm.loss import SoftTargetCrossEntropy

import dyvm  # noqa: F401  (registers the timm names)
from dyvm.checkpoint import load_checkpoint
from dyvm.losses import LOSS_PARTS, DyVMLoss, build_teacher
from tests.models.golden import assert_training_output_matches, load_golden, rel

BACKBONES = {"videomamba": "dyvm_videomamba_tiny", "mambareg": "dyvm_mambareg_small"}  # sizes set by the golden


def _options(golden):
    c = golden["config"]
    options = dict(img_size=c["img_size"], patch_size=c["patch_size"], depth=c["depth"], embed_dim=c["embed_dim"],
                   num_classes=c["num_classes"])
    options.update({k: c[k] for k in ("num_cls_tokens", "cls_reduce") if k in c})
    return options


class Recorder:
    """Records, per gated layer and call, the gate head's logits and the class positions its gate read;
    take() hands over what a pass recorded and starts afresh."""

    def __init__(self, model):
        self.logits, self.positions = [], []
        for layer in model.layers:
            mixer = layer.mixer
            mixer.block_head.register_forward_hook(lambda m, i, o: self.logits.append(o.detach()))
            mixer.gate_logits = self._wrap(mixer.gate_logits)

    def _wrap(self, gate_logits):
        def recorded(xz, cls_positions, *args):
            pos = cls_positions if torch.is_tensor(cls_positions) else torch.tensor(cls_positions)
            self.positions.append(pos.expand(xz.shape[0], -1))
            return gate_logits(xz, cls_positions, *args)
        return recorded

    def take(self):
        taken = (torch.stack(self.logits), self.positions)
        self.logits, self.positions = [], []
        return taken


class Run:
    """A golden file and what our model computed for it: dense, eval and training passes."""

    def __init__(self, family):
        self.golden = g = load_golden(f"authors_dyvm_{family}_tiny.pt")
        options, p = _options(g), g["pruning"]
        name = BACKBONES[family]
        self.dense = timm.create_model(name[len("dyvm_"):], **options).eval()
        self.dense_report = load_checkpoint(self.dense, g["dense_state_dict"])
        with torch.no_grad():
            self.dense_logits, self.dense_tokens = self.dense.forward_with_tokens(g["input"])
        self.model = timm.create_model(name, **options, pruning_loc=tuple(p["pruning_loc"]),
                                       token_keep_ratios=tuple(p["token_ratio"]),
                                       block_keep_ratio=p["block_keep_ratio"], gumbel_noise=False)
        self.report = load_checkpoint(self.model, {"model": g["dyvm_state_dict"]})
        recorder = Recorder(self.model)
        self.model.eval()
        with torch.no_grad():
            self.eval = self.model.forward_aux(g["input"])
        self.eval_gate_logits, self.eval_positions = recorder.take()
        self.model.train()
        self.train = self.model.forward_aux(g["input"])
        self.train_gate_logits, self.train_positions = recorder.take()
        self.teacher = build_teacher(self.model.cfg, g["teacher_state_dict"])
        w = g["loss_weights"]
        criterion = DyVMLoss(SoftTargetCrossEntropy(), self.teacher, w["token_keep"], w["block_keep"],
                             clf_weight=w["clf"], token_weight=w["token"], block_weight=w["block"],
                             distill_weight=w["distill"])
        self.loss, self.parts = criterion(g["input"], self.train, g["target"])
        self.loss.backward()


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def run(request):
    return Run(request.param)


def test_dense_teacher_matches(run):
    g = run.golden
    assert run.dense_report.source == "dense"
    assert rel(run.dense_logits, g["dense_logits"]) < 1e-4
    assert rel(run.dense_tokens, g["dense_patch_tokens"]) < 1e-4  # original patch order, class tokens removed
    with torch.no_grad():
        teacher_logits, teacher_tokens = run.teacher.forward_with_tokens(g["input"])
    assert rel(teacher_logits, g["teacher_logits"]) < 1e-4
    assert rel(teacher_tokens, g["teacher_patch_tokens"]) < 1e-4


def test_eval_matches(run):
    g, out = run.golden, run.eval
    assert run.report.source == "dyvm" and not run.report.gates_initialised and not run.report.missing_dyvm_heads
    assert rel(out.logits, g["dyvm_logits"]) < 1e-4
    assert rel(run.eval_gate_logits, g["dyvm_gate_logits"]) < 1e-4
    assert torch.equal(out.gates, g["dyvm_block_policy"][:, :, 0])
    for decision, kept in zip(out.decisions, g["dyvm_kept_patches"], strict=True):
        assert torch.equal(decision.nonzero()[:, 1].view(kept.shape), kept)
    assert torch.equal(out.slot_to_patch, g["dyvm_kept_patches"][-1])
    if "dyvm_reg_positions" in g:  # MambaReg: the registers re-spread among the kept patches after every stage
        assert all(torch.equal(a, b) for a, b in zip(run.eval_positions, g["dyvm_reg_positions"], strict=True))
    else:  # VideoMamba: the class token stays first
        assert all(p.eq(0).all() for p in run.eval_positions)


def test_training_forward_matches(run):
    g = run.golden
    assert_training_output_matches(run.train, g)
    assert rel(run.train_gate_logits, g["train_gate_logits"]) < 1e-4
    if "train_reg_positions" in g:  # per image, from its own kept count
        assert all(torch.equal(a, b) for a, b in zip(run.train_positions, g["train_reg_positions"],
                                                     strict=True))
    else:
        assert all(p.eq(0).all() for p in run.train_positions)


def test_loss_terms_and_gradients_match(run):
    g = run.golden
    assert list(run.parts) == list(LOSS_PARTS)
    torch.testing.assert_close(torch.stack(list(run.parts.values())), g["loss_parts"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run.loss.detach(), g["loss"], rtol=1e-5, atol=1e-6)
    params = dict(run.model.named_parameters())
    assert set(g["grads"]) <= set(params)
    for name, expected in g["grads"].items():
        assert params[name].grad is not None, name
        assert rel(params[name].grad, expected) < 1e-4, name
