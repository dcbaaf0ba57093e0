"""Each DyVM loss term against a hand computation on tiny tensors."""
import math

import pytest
import torch
import torch.nn as nn
from timm.loss import SoftTargetCrossEntropy

from dyvm.losses import LOSS_PARTS, DyVMLoss, block_ratio_loss, distill_kl, token_distill_mse, token_ratio_loss
from dyvm.models.dyvm import ForwardOutput


def test_token_ratio_loss_by_hand():
    d1 = torch.tensor([[1., 1., 0., 0.], [1., 1., 1., 1.]])  # means 0.5, 1.0
    d2 = torch.tensor([[1., 0., 0., 0.], [0., 0., 0., 0.]])  # means 0.25, 0.0
    expected = ((0.5 - 0.6) ** 2 + (1.0 - 0.6) ** 2) / 2 + ((0.25 - 0.3) ** 2 + (0.0 - 0.3) ** 2) / 2
    assert token_ratio_loss([d1, d2], [0.6, 0.3]).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="token keep ratios"):
        token_ratio_loss([d1, d2], [0.6])


def test_block_ratio_loss_is_one_global_mean():
    gates = torch.tensor([[[1., 0.], [1., 1.]], [[0., 0.], [1., 1.]]])  # mean 5/8
    assert block_ratio_loss(gates, 0.8).item() == pytest.approx((5 / 8 - 0.8) ** 2)


def test_kl_by_hand():
    s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    ps, pt = s.softmax(-1)[0].tolist(), t.softmax(-1)[0].tolist()
    expected = sum(q * math.log(q / p) for p, q in zip(ps, pt))
    assert distill_kl(s, t).item() == pytest.approx(expected, rel=1e-6)


def test_token_mse_aligns_by_slot_map_and_uses_kept_slots_only():
    teacher = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)  # (B, M, D), original order
    slot_to_patch = torch.tensor([[2, 0, 1], [1, 2, 0]])
    policy = torch.tensor([[1., 1., 0.], [1., 0., 0.]]).unsqueeze(-1)
    student = torch.zeros(2, 3, 2)
    student[0, 0] = teacher[0, 2] + 1.0  # error 1 on both channels
    student[0, 1] = teacher[0, 0]  # exact
    student[1, 0] = teacher[1, 1] + 2.0  # error 2
    student[0, 2] = 100.0  # pruned slot: ignored
    expected = (1 + 1 + 0 + 0 + 4 + 4) / (3 * 2)
    assert token_distill_mse(student, policy, slot_to_patch, teacher).item() == pytest.approx(expected)
    assert token_distill_mse(student, torch.zeros_like(policy), slot_to_patch, teacher).item() == 0.0


class FixedTeacher(nn.Module):
    def __init__(self, logits, tokens):
        super().__init__()
        self.logits, self.tokens = logits, tokens
        self.scale = nn.Parameter(torch.ones(()))

    def forward_with_tokens(self, images):
        return self.logits * self.scale, self.tokens * self.scale


def _output(requires_grad=True):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, requires_grad=requires_grad)
    return ForwardOutput(
        logits=logits, patch_tokens=torch.randn(2, 4, 5, requires_grad=requires_grad),
        final_policy=torch.tensor([[1., 1., 0., 0.], [1., 1., 1., 0.]]).unsqueeze(-1),
        slot_to_patch=torch.tensor([[3, 1, 0, 2], [0, 1, 2, 3]]),
        decisions=[torch.tensor([[1., 1., 1., 0.], [1., 1., 1., 1.]]),
                   torch.tensor([[1., 1., 0., 0.], [1., 1., 1., 0.]])],
        gates=torch.tensor([[[1., 1.], [0., 1.]]]), seq_lens=[5])


def test_total_is_the_weighted_sum_and_parts_are_weighted():
    out = _output()
    target = torch.tensor([[0.2, 0.8, 0.0], [1.0, 0.0, 0.0]])
    teacher = FixedTeacher(torch.randn(2, 3), torch.randn(2, 4, 5))
    w = dict(clf_weight=2.0, token_weight=10.0, block_weight=4.0, distill_weight=0.5)
    loss_fn = DyVMLoss(SoftTargetCrossEntropy(), teacher, (0.7, 0.49), 0.8, **w)
    total, parts = loss_fn(torch.zeros(2, 3, 8, 8), out, target)
    assert list(parts) == list(LOSS_PARTS)
    cls = SoftTargetCrossEntropy()(out.logits, target)
    tok = token_ratio_loss(out.decisions, (0.7, 0.49))
    blk = block_ratio_loss(out.gates, 0.8)
    kl = distill_kl(out.logits, teacher.logits)
    td = token_distill_mse(out.patch_tokens, out.final_policy, out.slot_to_patch, teacher.tokens)
    expected = [2.0 * cls, 10.0 * tok / 2, 4.0 * blk, 0.5 * kl, 0.5 * td]
    for name, value in zip(LOSS_PARTS, expected):
        assert parts[name].item() == pytest.approx(value.item(), rel=1e-6), name
        assert not parts[name].requires_grad
    assert total.item() == pytest.approx(sum(v.item() for v in expected), rel=1e-6)
    total.backward()
    assert out.logits.grad is not None and out.patch_tokens.grad is not None
    assert teacher.scale.grad is None and not teacher.training  # frozen, eval mode


def test_terms_that_do_not_apply_are_zero_and_present():
    out = _output()
    out.decisions, out.gates = [], None
    total, parts = DyVMLoss(nn.CrossEntropyLoss(), None, (0.7,), 0.8)(None, out, torch.tensor([0, 2]))
    assert list(parts) == list(LOSS_PARTS)
    assert all(parts[n].item() == 0.0 for n in LOSS_PARTS[1:])
    assert total.item() == pytest.approx(parts["cls_loss"].item())


def test_token_distill_can_be_switched_off():
    out = _output()
    teacher = FixedTeacher(torch.randn(2, 3), torch.randn(2, 4, 5))
    _, parts = DyVMLoss(nn.CrossEntropyLoss(), teacher, (0.7, 0.49), 0.8, token_distill=False)(
        torch.zeros(2, 3, 4, 4), out, torch.tensor([0, 2]))
    assert parts["token_kl_loss"].item() == 0.0 and parts["cls_kl_loss"].item() > 0


def test_non_finite_loss_fails_fast_naming_the_term():
    out = _output(requires_grad=False)
    out.logits = torch.tensor([[float("nan"), 0.0, 0.0], [0.0, 0.0, 0.0]])
    with pytest.raises(FloatingPointError, match="cls_loss"):
        DyVMLoss(nn.CrossEntropyLoss(), None, (0.7, 0.49), 0.8)(None, out, torch.tensor([0, 2]))


def test_from_model_takes_the_model_ratios_and_drops_constant_terms():
    import timm

    import dyvm  # noqa: F401

    model = timm.create_model("dyvm_vim_tiny", img_size=32, patch_size=8, depth=4, embed_dim=32, num_classes=10,
                              pruning_loc=(1, 2, 3), token_keep_ratio=0.8, block_keep_ratio=0.6)
    loss_fn = DyVMLoss.from_model(model, nn.CrossEntropyLoss(), None, token_weight=3.0)
    assert loss_fn.token_keep_ratios == pytest.approx((0.8, 0.64, 0.512)) and loss_fn.block_keep_ratio == 0.6
    assert loss_fn.token_weight == 3.0
    random = timm.create_model("dyvm_vim_tiny", img_size=32, patch_size=8, depth=4, embed_dim=32, num_classes=10,
                               pruning_loc=(1, 2, 3), pruning="random")
    assert DyVMLoss.from_model(random, nn.CrossEntropyLoss(), None).token_weight == 0.0


class LinearTeacher(nn.Module):
    """A teacher whose outputs follow autocast (a matmul), recording the dtype it computed in."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.seen = None

    def forward_with_tokens(self, images):
        logits = self.head(images.flatten(1)[:, :8])
        self.seen = logits.dtype
        return logits, torch.zeros(2, 4, 5, dtype=logits.dtype)


@pytest.mark.parametrize("teacher_dtype,expected", [("auto", torch.float32), (torch.bfloat16, torch.bfloat16),
                                                     (None, torch.float32)])
def test_teacher_dtype_sets_the_teachers_precision_only(teacher_dtype, expected):
    """--teacher-dtype: the teacher runs in its own autocast dtype (here, fp32 training), its logits enter the
    KL term in the student's dtype, and the KL matches the one computed from those rounded logits."""
    torch.manual_seed(0)
    teacher, out, images = LinearTeacher(), _output(), torch.randn(2, 3, 4, 4)
    loss_fn = DyVMLoss(nn.CrossEntropyLoss(), teacher, (0.7, 0.49), 0.8, teacher_dtype=teacher_dtype)
    total, parts = loss_fn(images, out, torch.tensor([0, 2]))
    assert teacher.seen == expected and total.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=expected == torch.bfloat16):
        want_logits = teacher.head(images.flatten(1)[:, :8])
    want = 0.5 * distill_kl(out.logits, want_logits.float())
    assert parts["cls_kl_loss"].item() == pytest.approx(want.item(), rel=1e-6)


def test_starting_the_teacher_ahead_does_nothing_off_a_gpu():
    """DyVMLoss.teacher_ahead runs the teacher on a side stream of the images' GPU (checked at full size by
    benchmarks/gpu_check.py: the same loss and gradients); on a CPU it leaves nothing behind and the loss runs
    its teacher itself."""
    from timm.loss import SoftTargetCrossEntropy

    from dyvm.engine import start_teacher
    from dyvm.losses import DyVMLoss, build_teacher
    from dyvm.models.registry import create_model

    torch.manual_seed(0)
    kw = dict(img_size=16, patch_size=8, depth=4, embed_dim=16, num_classes=5)
    dense = create_model("vim_tiny", **kw)
    student = create_model("dyvm_vim_tiny", pruning_loc=(1, 2), token_keep_ratios=(0.75, 0.5), gumbel_noise=False,
                           **kw).train()
    teacher = build_teacher(student.cfg, dense.state_dict())
    criterion = DyVMLoss.from_model(student, SoftTargetCrossEntropy(), teacher)
    x, y = torch.randn(2, 3, 16, 16), torch.softmax(torch.randn(2, 5), -1)
    want = criterion(x, student.forward_aux(x), y)[0]
    start_teacher(criterion, x)
    assert criterion._ahead is None
    assert torch.equal(criterion(x, student.forward_aux(x), y)[0], want)
    start_teacher(torch.nn.CrossEntropyLoss(), x)  # a criterion without a teacher: nothing to start
