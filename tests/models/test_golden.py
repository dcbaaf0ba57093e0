"""Our DyVM against the authors' own code (tests/golden, see its README): eval and training mode."""
import timm
import torch
from timm.loss import SoftTargetCrossEntropy

import dyvm  # noqa: F401  (registers the timm names)
from dyvm.checkpoint import load_checkpoint
from dyvm.losses import LOSS_PARTS, DyVMLoss, build_teacher
from tests.models.golden import assert_training_output_matches, load_golden, rel

EVAL_FILE, TRAIN_FILE = "authors_dyvm_tiny.pt", "authors_dyvm_tiny_train.pt"


def _model(golden, **options):
    c, p = golden["config"], golden["pruning"]
    return timm.create_model("dyvm_vim_tiny", img_size=c["img_size"], patch_size=c["patch_size"], depth=c["depth"],
                             embed_dim=c["embed_dim"], d_state=c["d_state"], num_classes=c["num_classes"],
                             pruning_loc=tuple(p["pruning_loc"]), token_keep_ratios=tuple(p["token_ratio"]),
                             block_keep_ratio=p["block_keep_ratio"], **options)


def test_eval_matches_authors():
    golden = load_golden(EVAL_FILE)
    model = _model(golden)
    report = load_checkpoint(model, golden["dyvm_state_dict"])
    assert report.source == "dyvm" and not report.gates_initialised and not report.missing_dyvm_heads
    model.eval()
    with torch.no_grad():
        out = model.forward_aux(golden["input"])
    assert rel(out.logits, golden["dyvm_logits"]) < 1e-4
    assert torch.equal(out.gates, golden["dyvm_block_policy"][:, :, 0])
    m = golden["config"]["img_size"] // golden["config"]["patch_size"]
    counts = [int(r * m * m) for r in golden["pruning"]["token_ratio"]]
    assert [d.sum(1).tolist() for d in out.decisions] == [[k] * 4 for k in counts]
    assert out.patch_tokens.shape[1] == counts[-1]


def test_training_step_matches_authors():
    golden, train = load_golden(EVAL_FILE), load_golden(TRAIN_FILE)
    model = _model(golden, gumbel_noise=False)
    load_checkpoint(model, {"model": train["dyvm_state_dict"]})
    teacher = build_teacher(model.cfg, train["teacher_state_dict"])
    w = train["loss_weights"]
    criterion = DyVMLoss(SoftTargetCrossEntropy(), teacher, w["token_keep"], w["block_keep"], clf_weight=w["clf"],
                         token_weight=w["token"], block_weight=w["block"], distill_weight=w["distill"])
    model.train()
    images = golden["input"]
    out = model.forward_aux(images)

    assert_training_output_matches(out, train)

    loss, parts = criterion(images, out, train["target"])
    assert list(parts) == list(LOSS_PARTS)
    torch.testing.assert_close(torch.stack(list(parts.values())), train["loss_parts"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.detach(), train["loss"], rtol=1e-5, atol=1e-6)

    loss.backward()
    params = dict(model.named_parameters())
    assert set(train["grads"]) <= set(params)
    for name, expected in train["grads"].items():
        assert params[name].grad is not None, name
        assert rel(params[name].grad, expected) < 1e-4, name
