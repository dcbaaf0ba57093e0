"""Token pruning as small pure functions on (B, N, C) tensors, plus the keep-set selection rules.

Vocabulary: a sequence holds N patch tokens and one class token at `cls_index` (an int when it is the same
for every sample, as at inference; a (B,) LongTensor when it differs per sample, as in training). A
"slot" is a position of the patch-token sequence (class token removed); `slot_to_patch` (B, N) maps a
slot to the original patch index. `policy` (B, N) is 1 for a slot holding a kept token, 0 for a pruned one.

Training keeps the full length: pruned tokens are moved behind the kept ones (both in original order) and
masked out of the scans. Inference gathers the kept tokens, so the sequence physically shrinks. Both put
the class token in the middle of the kept tokens, so a kept token sees the same neighbours either way.
"""
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

ClsIndex = Union[int, Tensor]


def keep_count(ratio: float, num_patches: int) -> int:
    """Number of patches an inference stage keeps: int(ratio * num_patches), as the authors count."""
    return int(ratio * num_patches)


def batch_gather(x: Tensor, index: Tensor) -> Tensor:
    """x (B, N, ...) and index (B, K) -> (B, K, ...): x[b, index[b, j]]."""
    idx = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, idx)


def _others_index(cls_index: Tensor, num_others: int) -> Tensor:
    """(B,) class positions -> (B, N) position in the full sequence of each patch slot."""
    slots = torch.arange(num_others, device=cls_index.device).unsqueeze(0)
    return slots + (slots >= cls_index.unsqueeze(1)).long()


def split_cls(x: Tensor, cls_index: ClsIndex) -> tuple[Tensor, Tensor]:
    """x (B, N+1, C) -> (class token (B, 1, C), patch tokens (B, N, C))."""
    if isinstance(cls_index, int):
        return x[:, cls_index:cls_index + 1], torch.cat([x[:, :cls_index], x[:, cls_index + 1:]], dim=1)
    cls = batch_gather(x, cls_index.unsqueeze(1))
    return cls, batch_gather(x, _others_index(cls_index, x.shape[1] - 1))


def insert_cls(others: Tensor, cls: Tensor, cls_index: ClsIndex) -> Tensor:
    """Patch tokens (B, N, C) and class token (B, 1, C) -> (B, N+1, C) with the class token at cls_index."""
    if isinstance(cls_index, int):
        return torch.cat([others[:, :cls_index], cls, others[:, cls_index:]], dim=1)
    num_others = others.shape[1]
    pos = torch.arange(num_others + 1, device=others.device).unsqueeze(0)
    # source row in cat([others, cls]): slots before the class token, then the class token (row N), then the rest
    c = cls_index.unsqueeze(1)
    src = torch.where(pos < c, pos, torch.where(pos == c, torch.full_like(pos, num_others), pos - 1))
    return batch_gather(torch.cat([others, cls.to(others.dtype)], dim=1), src)


def gather_tokens(x: Tensor, index: Tensor, cls_index: int, new_cls_index: int) -> Tensor:
    """x (B, N+1, C) with the class token at cls_index, index (B, k) of patch slots to keep
    -> (B, k+1, C): those tokens in index order, the class token at new_cls_index. One gather, no concat."""
    position = index + (index >= cls_index).long()  # slot -> position in the sequence
    cls = torch.full((index.shape[0], 1, 1), cls_index, dtype=index.dtype, device=index.device)
    return batch_gather(x, insert_cls(position.unsqueeze(-1), cls, new_cls_index).squeeze(-1))


def kept_first_order(policy: Tensor) -> Tensor:
    """policy (B, N) -> permutation (B, N): kept slots in their current order, then pruned ones in theirs.

    A stable sort on "is pruned" does it for the whole batch at once (no loop over samples).
    """
    return torch.sort((policy <= 0.5).to(torch.int8), dim=1, stable=True).indices


def sorted_topk(score: Tensor, k: int) -> Tensor:
    """score (B, N) -> indices (B, k) of the k largest, in ascending slot order (so original order is kept)."""
    return score.topk(k, dim=1, sorted=False).indices.sort(dim=1).values


def indices_to_mask(index: Tensor, length: int) -> Tensor:
    """index (B, K) -> (B, length) float mask with ones at index."""
    return torch.zeros(index.shape[0], length, device=index.device).scatter_(1, index, 1.0)


def to_original_order(values: Tensor, slot_to_patch: Tensor, num_patches: int) -> Tensor:
    """values (B, N) per slot -> (B, num_patches) per original patch (zeros where no slot maps). Keeps grads."""
    out = torch.zeros(values.shape[0], num_patches, dtype=values.dtype, device=values.device)
    return out.scatter(1, slot_to_patch, values)


def straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    """Forward value `hard`, gradient of `soft`."""
    return hard - soft.detach() + soft


def gumbel_softmax_keep(log_probs: Tensor, noise: bool, tau: float = 1.0) -> Tensor:
    """(B, N, 2) [keep, drop] log-probabilities -> (B, N) hard 0/1 keep, straight-through (hard Gumbel-softmax).

    noise=False drops the Gumbel noise: keep = argmax, gradient of softmax(log_probs / tau).
    """
    if noise:
        return F.gumbel_softmax(log_probs, tau=tau, hard=True)[..., 0]
    soft = (log_probs / tau).softmax(-1)
    hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    return straight_through(hard, soft)[..., 0]


def gumbel_sigmoid_gate(logits: Tensor, noise: bool, tau: float = 2.0, threshold: float = 0.5) -> Tensor:
    """Gate logits -> hard 0/1 gates, straight-through through sigmoid((logits + g1 - g2) / tau).

    g1, g2 ~ Gumbel(0, 1); noise=False drops them (deterministic training decisions).
    """
    if noise:
        g1 = -torch.empty_like(logits).exponential_().log()
        g2 = -torch.empty_like(logits).exponential_().log()
        logits = logits + g1 - g2
    soft = torch.sigmoid(logits / tau)
    return straight_through((soft > threshold).to(soft.dtype), soft)


# ---- keep-set selection rules (the pruning ablations) ----------------------------------------------------
# Each rule gives, per stage: in training a (B, N) 0/1 keep over the current slots (cumulative: a pruned slot
# stays pruned), at inference the sorted indices of the k slots to keep. `policy` (B, N) is the current keep;
# by construction the kept slots come first in training, and every slot is kept at inference (policy all ones).
# `log_probs` (B, N, 2) is the predictor's output, None for the rules without a predictor.


class LearnedSelection:
    """The DyVM rule: predictor log-probabilities; hard Gumbel-softmax in training, top-k at inference."""

    needs_predictor = True

    def __init__(self, gumbel_noise: bool = True):
        self.gumbel_noise = gumbel_noise

    def train_keep(self, log_probs: Tensor, policy: Tensor, k: int) -> Tensor:
        return gumbel_softmax_keep(log_probs, self.gumbel_noise) * policy

    def eval_indices(self, log_probs: Tensor, policy: Tensor, k: int) -> Tensor:
        return sorted_topk(log_probs[..., 0], k)


class _ScoredSelection:
    """A rule given by a score over the kept slots: keep exactly k per sample, same rule in both modes."""

    needs_predictor = False

    def score(self, policy: Tensor, k: int) -> Tensor:
        raise NotImplementedError

    def train_keep(self, log_probs, policy: Tensor, k: int) -> Tensor:
        score = self.score(policy, k).masked_fill(policy <= 0.5, float("-inf"))
        return indices_to_mask(score.topk(k, dim=1).indices, policy.shape[1]) * policy

    def eval_indices(self, log_probs, policy: Tensor, k: int) -> Tensor:
        return sorted_topk(self.score(policy, k), k)


class RandomSelection(_ScoredSelection):
    """Ablation: k kept slots drawn uniformly at random among the kept ones."""

    def score(self, policy: Tensor, k: int) -> Tensor:
        return torch.rand(policy.shape, device=policy.device)


class StaticSelection(_ScoredSelection):
    """Ablation: k evenly spaced slots among the n kept ones (positions floor(j*(n-1)/(k-1))), every image alike."""

    def score(self, policy: Tensor, k: int) -> Tensor:
        n = (policy > 0.5).sum(1, keepdim=True)  # kept slots come first, so slot == rank among the kept
        j = torch.arange(k, device=policy.device).unsqueeze(0)
        pos = (j * (n - 1)) // (k - 1) if k > 1 else (n - 1) // 2
        return indices_to_mask(pos.expand(policy.shape[0], k).contiguous(), policy.shape[1])


def make_selection(pruning: str, gumbel_noise: bool = True):
    rules = {"learned": lambda: LearnedSelection(gumbel_noise), "random": RandomSelection,
             "static": StaticSelection}
    if pruning not in rules:
        raise ValueError(f"pruning must be one of {sorted(rules) + ['none']}, got {pruning!r}")
    return rules[pruning]()
