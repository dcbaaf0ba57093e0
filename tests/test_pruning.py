"""The token-pruning functions against plain per-sample Python references."""
import pytest
import torch

from dyvm.pruning import (LearnedSelection, RandomSelection, StaticSelection, batch_gather, gumbel_sigmoid_gate,
                          gumbel_softmax_keep, insert_cls, kept_first_order, make_selection, sorted_topk, split_cls,
                          to_original_order)


def _random_policy(batch, n):
    return (torch.rand(batch, n) < 0.6).float()


def test_split_and_insert_cls_per_sample_match_a_loop():
    x = torch.randn(5, 9, 3)
    cls_index = torch.tensor([0, 4, 8, 2, 4])
    cls, others = split_cls(x, cls_index)
    for b, c in enumerate(cls_index.tolist()):
        torch.testing.assert_close(cls[b, 0], x[b, c])
        torch.testing.assert_close(others[b], torch.cat([x[b, :c], x[b, c + 1:]]))
    torch.testing.assert_close(insert_cls(others, cls, cls_index), x)
    # int index: the same thing by slicing
    cls_i, others_i = split_cls(x, 4)
    torch.testing.assert_close(others_i, split_cls(x, torch.full((5,), 4))[1])
    torch.testing.assert_close(insert_cls(others_i, cls_i, 4), x)


def test_kept_first_order_is_stable_and_matches_a_loop():
    policy = _random_policy(6, 17)
    order = kept_first_order(policy)
    for b in range(6):
        kept = [i for i in range(17) if policy[b, i] > 0.5]
        dropped = [i for i in range(17) if policy[b, i] <= 0.5]
        assert order[b].tolist() == kept + dropped


def test_sorted_topk_and_gather():
    score = torch.randn(4, 12)
    index = sorted_topk(score, 5)
    for b in range(4):
        assert index[b].tolist() == sorted(score[b].argsort(descending=True)[:5].tolist())
    x = torch.randn(4, 12, 2)
    torch.testing.assert_close(batch_gather(x, index), torch.stack([x[b, index[b]] for b in range(4)]))


def test_to_original_order_carries_gradient():
    values = torch.rand(3, 6, requires_grad=True)
    perm = torch.stack([torch.randperm(6) for _ in range(3)])
    out = to_original_order(values, perm, 6)
    for b in range(3):
        for j in range(6):
            assert out[b, perm[b, j]] == values[b, j]
    out.sum().backward()
    torch.testing.assert_close(values.grad, torch.ones(3, 6))


def test_gumbel_decisions_are_hard_with_straight_through_gradients():
    log_probs = torch.randn(2, 7, 2).log_softmax(-1).requires_grad_()
    keep = gumbel_softmax_keep(log_probs, noise=False)
    assert torch.equal(keep.detach(), (log_probs[..., 0] > log_probs[..., 1]).float())
    keep.sum().backward()
    soft = log_probs.detach().softmax(-1)[..., 0]
    torch.testing.assert_close(log_probs.grad[..., 0], soft * (1 - soft))
    noisy = gumbel_softmax_keep(log_probs, noise=True)
    assert set(noisy.detach().unique().tolist()) <= {0.0, 1.0}

    logits = torch.randn(3, 2, requires_grad=True)
    gate = gumbel_sigmoid_gate(logits, noise=False, tau=2.0)
    assert torch.equal(gate.detach(), (logits > 0).float())
    gate.sum().backward()
    s = torch.sigmoid(logits.detach() / 2)
    torch.testing.assert_close(logits.grad, s * (1 - s) / 2)


def test_gumbel_gate_noise_is_the_difference_of_two_gumbels():
    """With noise, a gate is on with probability P(logit + g1 - g2 > 0) = sigmoid(logit) for g1, g2 ~ Gumbel(0, 1),
    whatever tau; its straight-through gradient is the noisy sigmoid's, finite even where a draw is extreme."""
    torch.manual_seed(0)
    logits = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0]).repeat(200_000, 1).requires_grad_()
    gate = gumbel_sigmoid_gate(logits, noise=True, tau=2.0)
    assert set(gate.detach().unique().tolist()) <= {0.0, 1.0}
    p = torch.sigmoid(logits.detach()[0])
    sigma = (p * (1 - p) / logits.shape[0]).sqrt()
    assert ((gate.detach().mean(0) - p).abs() < 5 * sigma).all(), (gate.detach().mean(0), p)
    gate.sum().backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad >= 0).all() and (logits.grad <= 0.125).all()


@pytest.mark.parametrize("rule", [RandomSelection(), StaticSelection()])
def test_exact_count_rules_are_cumulative_and_same_in_both_modes(rule):
    n, k = 20, 7
    policy = torch.zeros(3, n)
    policy[:, :12] = 1  # the training layout: kept slots first
    keep = rule.train_keep(None, policy, k)
    assert keep.sum(1).tolist() == [k] * 3
    assert (keep <= policy).all()  # a pruned slot is never revived
    index = rule.eval_indices(None, torch.ones(3, 12), k)
    assert index.shape == (3, k) and (index.diff(dim=1) > 0).all()


def test_static_rule_is_evenly_spaced_and_identical_in_both_modes():
    policy = torch.zeros(2, 30)
    policy[:, :13] = 1
    keep = StaticSelection().train_keep(None, policy, 5)
    expected = [j * 12 // 4 for j in range(5)]
    assert [i for i in range(30) if keep[0, i]] == expected
    assert torch.equal(keep[0], keep[1])
    assert StaticSelection().eval_indices(None, torch.ones(2, 13), 5).tolist() == [expected] * 2


def test_make_selection_rejects_unknown_rule():
    assert isinstance(make_selection("learned"), LearnedSelection)
    with pytest.raises(ValueError, match="pruning must be one of"):
        make_selection("magic")


def test_gather_tokens_equals_split_gather_insert():
    x = torch.randn(3, 11, 4)
    index = sorted_topk(torch.randn(3, 10), 6)
    cls, others = split_cls(x, 5)
    expected = insert_cls(batch_gather(others, index), cls, 3)
    from dyvm.pruning import gather_tokens

    torch.testing.assert_close(gather_tokens(x, index, 5, 3), expected)


def test_several_class_tokens_split_insert_and_gather_match_a_loop():
    """MambaReg's registers: n class tokens at per-sample or shared positions."""
    from dyvm.pruning import cls_columns_mean, gather_tokens, take_cls

    x = torch.randn(3, 12, 2)
    positions = torch.tensor([[0, 5, 11], [2, 3, 7], [9, 10, 11]])
    cls, others = split_cls(x, positions)
    for b in range(3):
        pos = positions[b].tolist()
        torch.testing.assert_close(cls[b], x[b, pos])
        torch.testing.assert_close(others[b], x[b, [i for i in range(12) if i not in pos]])
    torch.testing.assert_close(insert_cls(others, cls, positions), x)
    torch.testing.assert_close(take_cls(x, positions), cls)
    static = (1, 6, 8)  # the same positions for every sample: slicing, and the same result as a tensor
    cls_s, others_s = split_cls(x, static)
    torch.testing.assert_close(others_s, split_cls(x, torch.tensor([static] * 3))[1])
    torch.testing.assert_close(insert_cls(others_s, cls_s, static), x)
    # the gate input: the mean over the class tokens' columns (channels first)
    xz = x.transpose(1, 2)
    torch.testing.assert_close(cls_columns_mean(xz, static), x[:, list(static)].mean(1))
    torch.testing.assert_close(cls_columns_mean(xz, positions), cls.mean(1))
    torch.testing.assert_close(cls_columns_mean(xz, (4,)), x[:, 4])
    # inference gather: keep 5 of the 9 patch slots, move the class tokens to new positions
    index = sorted_topk(torch.randn(3, 9), 5)
    expected = insert_cls(batch_gather(others_s, index), cls_s, (0, 2, 7))
    torch.testing.assert_close(gather_tokens(x, index, static, (0, 2, 7)), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_column_tap_gives_the_indexing_gradient_bit_for_bit(dtype):
    """tap_cls_columns (one autograd node for the gate's column read and the rest of xz, no full-size gradient
    for the columns) gives xz exactly the gradient that reading the columns by indexing gives: one class
    token or several, shared or per-sample positions, xz in the mixer's channels-last layout."""
    from dyvm.pruning import cls_columns_mean, tap_cls_columns

    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 9, 12, generator=g).to(dtype).transpose(1, 2)  # (B, C, L), channels-last
    w, dout = torch.randn(12, 3, generator=g).to(dtype), torch.randn(2, 12, 9, generator=g).to(dtype)
    for positions in (0, (1, 5, 7), torch.tensor([2, 6]), torch.tensor([[0, 4], [3, 8]])):
        grads = []
        for read in (lambda xz: (xz, cls_columns_mean(xz, positions)), lambda xz: tap_cls_columns(xz, positions)):
            xz = base.clone().requires_grad_()
            rest, cols = read(xz)
            loss = (cols @ w).square().sum() + (rest[:, :6] * dout[:, :6]).sum() \
                + (rest[:, 6:].sin() * dout[:, 6:]).sum()
            loss.backward()
            grads.append(xz.grad)
        assert torch.equal(grads[0], grads[1]), positions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_reorder_as_one_permutation_matches_split_gather_insert(dtype):
    """A training stage's reorder (kept slots first, class tokens moved) as one permutation of the sequence
    (gather_index + permute_tokens, whose backward gathers by the inverse permutation) gives what splitting off
    the class tokens, gathering the slots and inserting the class tokens gives: values and gradients bit for
    bit, from shared or per-sample positions of one or several class tokens."""
    from dyvm.pruning import gather_index, kept_first_order, permute_tokens

    g = torch.Generator().manual_seed(0)
    B, N = 4, 10
    cases = [((3,), torch.tensor([[2], [5], [0], [9]])),
             (torch.tensor([[1], [4], [0], [10]]), torch.tensor([[3], [3], [6], [0]])),
             (torch.tensor([[0, 5, 10], [2, 3, 7], [9, 10, 11], [1, 2, 3]]),
              torch.tensor([[0, 6, 12], [1, 2, 3], [4, 8, 9], [10, 11, 12]])),
             ((1, 6, 8), torch.tensor([[0, 6, 12], [1, 2, 3], [4, 8, 9], [10, 11, 12]]))]
    for old, new in cases:
        L = N + new.shape[1]
        x0, dout = (torch.randn(B, L, 5, generator=g).to(dtype) for _ in range(2))
        order = kept_first_order((torch.rand(B, N, generator=g) > 0.4).float())
        results = []
        for one_permutation in (False, True):
            x = x0.clone().requires_grad_()
            if one_permutation:
                y = permute_tokens(x, gather_index(order, old, new, num_slots=N))
            else:
                cls, others = split_cls(x, old)
                y = insert_cls(batch_gather(others, order), cls, new)
            (y * dout).sum().backward()
            results.append((y.detach(), x.grad))
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
