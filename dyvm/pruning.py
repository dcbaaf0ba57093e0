"""Token pruning as small pure functions on (B, N, C) tensors, plus the keep-set selection rules.

Vocabulary: a sequence holds N patch tokens and n class tokens (one for Vim and VideoMamba, n registers for
MambaReg) at `cls_positions`: a tuple of ints (or one int) when they are the same for every sample, as at
inference; a (B, n) (or (B,)) LongTensor when they differ per sample, as in training. Several class tokens
are listed in ascending order. A "slot" is a position of the patch-token sequence (class tokens removed);
`slot_to_patch` (B, N) maps a slot to the original patch index. `policy` (B, N) is 1 for a slot holding a
kept token, 0 for a pruned one. Where the class tokens go is the backbone's choice (dyvm.models.layout).

Training keeps the full length: pruned tokens are moved behind the kept ones (both in original order) and
masked out of the scans. Inference gathers the kept tokens, so the sequence physically shrinks. Both place
the class tokens by the same rule from the number of kept tokens, so a kept token sees the same neighbours
either way.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from causal_conv1d.kernel_utils import ops_watched, triton_enabled

ClsPositions = Union[int, Tuple[int, ...], Tensor]
ClsIndex = ClsPositions  # the name from when there was always exactly one class token


def is_static(cls_positions: ClsPositions) -> bool:
    """True when the class tokens sit at the same positions in every sample (ints, not a tensor)."""
    return not isinstance(cls_positions, Tensor)


def _static(cls_positions) -> tuple:
    return (cls_positions,) if isinstance(cls_positions, int) else tuple(cls_positions)


def _per_sample(cls_positions: Tensor) -> Tensor:
    """(B,) or (B, n) -> (B, n)."""
    return cls_positions.unsqueeze(1) if cls_positions.dim() == 1 else cls_positions


def keep_count(ratio: float, num_patches: int) -> int:
    """Number of patches an inference stage keeps: int(ratio * num_patches), as the authors count."""
    return int(ratio * num_patches)


def batch_gather(x: Tensor, index: Tensor) -> Tensor:
    """x (B, N, ...) and index (B, K) -> (B, K, ...): x[b, index[b, j]]."""
    idx = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, idx)


def _others_index(cls_positions: Tensor, num_others: int) -> Tensor:
    """(B, n) class positions -> (B, N) position in the full sequence of each patch slot: the slot plus the
    number of class tokens before it (class token j has p_j - j patch slots before it)."""
    slots = torch.arange(num_others, device=cls_positions.device).unsqueeze(0)
    if cls_positions.shape[1] == 1:
        return slots + (slots >= cls_positions).long()
    before = cls_positions - torch.arange(cls_positions.shape[1], device=cls_positions.device)
    return slots + (slots.unsqueeze(-1) >= before.unsqueeze(1)).sum(-1)


def split_cls(x: Tensor, cls_positions: ClsPositions) -> tuple[Tensor, Tensor]:
    """x (B, N+n, C) -> (class tokens (B, n, C) in position order, patch tokens (B, N, C))."""
    cls = take_cls(x, cls_positions)
    if is_static(cls_positions):
        edges = (-1,) + _static(cls_positions) + (x.shape[1],)
        return cls, torch.cat([x[:, a + 1:b] for a, b in zip(edges[:-1], edges[1:])], dim=1)
    pos = _per_sample(cls_positions)
    return cls, batch_gather(x, _others_index(pos, x.shape[1] - pos.shape[1]))


def take_cls(x: Tensor, cls_positions: ClsPositions) -> Tensor:
    """x (B, N+n, C) -> the class tokens (B, n, C) in position order (split_cls without the patch tokens)."""
    if is_static(cls_positions):
        pos = _static(cls_positions)
        return x[:, pos[0]:pos[0] + 1] if len(pos) == 1 else torch.cat([x[:, p:p + 1] for p in pos], dim=1)
    return batch_gather(x, _per_sample(cls_positions))


def insert_cls(others: Tensor, cls: Tensor, cls_positions: ClsPositions) -> Tensor:
    """Patch tokens (B, N, C) and class tokens (B, n, C) -> (B, N+n, C) with the class tokens at cls_positions."""
    if is_static(cls_positions):
        pieces, start = [], 0
        for j, p in enumerate(_static(cls_positions)):  # p - j patch slots come before class token j
            pieces += [others[:, start:p - j], cls[:, j:j + 1]]
            start = p - j
        return torch.cat(pieces + [others[:, start:]], dim=1)
    pos = _per_sample(cls_positions)
    num_others = others.shape[1]
    seq = torch.arange(num_others + pos.shape[1], device=others.device).unsqueeze(0)
    # source row in cat([others, cls]): a patch slot is its position minus the class tokens before it; class
    # token j (j class tokens before it) is row N + j
    if pos.shape[1] == 1:
        c = pos
        src = torch.where(seq < c, seq, torch.where(seq == c, torch.full_like(seq, num_others), seq - 1))
    else:
        before = (seq.unsqueeze(-1) > pos.unsqueeze(1)).sum(-1)
        is_cls = (seq.unsqueeze(-1) == pos.unsqueeze(1)).any(-1)
        src = torch.where(is_cls, num_others + before, seq - before)
    return batch_gather(torch.cat([others, cls.to(others.dtype)], dim=1), src)


def gather_index(index: Tensor, cls_positions: ClsPositions, new_cls_positions: ClsPositions,
                 num_slots: int = 0) -> Tensor:
    """index (B, k) of the patch slots to keep, in a sequence with the class tokens at cls_positions
    -> (B, k+n) sequence positions to gather: those slots in index order, the class tokens moved to
    new_cls_positions. One index for every stream (hidden, residual) of the stage. Per-sample cls_positions
    need num_slots, the sequence's number of patch slots."""
    if is_static(cls_positions):
        old = _static(cls_positions)
        position = index
        for j, p in enumerate(old):  # slot -> position in the sequence: + the class tokens before it
            position = position + (index >= p - j)  # (long + bool is long: no cast kernel)
        cls = [torch.full((index.shape[0], 1, 1), p, dtype=index.dtype, device=index.device) for p in old]
        cls = cls[0] if len(cls) == 1 else torch.cat(cls, dim=1)
    else:
        if num_slots <= 0:
            raise ValueError("gather_index with per-sample class positions needs num_slots")
        pos = _per_sample(cls_positions)
        position, cls = _others_index(pos, num_slots).gather(1, index), pos.unsqueeze(-1)
    return insert_cls(position.unsqueeze(-1), cls, new_cls_positions).squeeze(-1)


STAGE_KERNELS = "mamba_ssm.ops.triton.pruning_stage"


def single_static_position(cls_positions: ClsPositions) -> Optional[int]:
    """The position of a single class token that sits at the same place in every sample, else None."""
    if not is_static(cls_positions):
        return None
    pos = _static(cls_positions)
    return pos[0] if len(pos) == 1 else None


def stage_kernels_apply(hidden: Tensor, residual: Optional[Tensor], *cls_positions: ClsPositions) -> bool:
    """Whether a pruning stage may take the inference kernels (mamba_ssm.ops.triton.pruning_stage) for its two
    streams: both given, of one shape, rows contiguous, no gradient, a device the kernels run on, nothing tracing
    or watching the ops (torch.compile, dispatch modes), and one class token at a static position in each of
    `cls_positions`."""
    if residual is None or residual.shape != hidden.shape or hidden.stride(-1) != 1 or residual.stride(-1) != 1:
        return False
    return (not (torch.is_grad_enabled() and (hidden.requires_grad or residual.requires_grad))
            and not ops_watched() and all(single_static_position(p) is not None for p in cls_positions)
            and triton_enabled(hidden, STAGE_KERNELS))


def gather_stage(hidden: Tensor, residual: Tensor, slot_to_patch: Tensor, index: Tensor,
                 cls_positions: ClsPositions, new_cls_positions: ClsPositions) -> Tuple[Tensor, Tensor, Tensor]:
    """An inference stage's gathers: index (B, k) of the patch slots to keep -> hidden and residual (B, k+n, C)
    holding those tokens in index order with the class tokens moved to new_cls_positions, and slot_to_patch of
    the kept slots (B, k). One kernel on the GPU where it applies (stage_kernels_apply), else the plain ops."""
    if stage_kernels_apply(hidden, residual, cls_positions, new_cls_positions):
        from mamba_ssm.ops.triton.pruning_stage import gather_stage as gather_by_kernel

        return gather_by_kernel(hidden, residual, slot_to_patch, index, single_static_position(cls_positions),
                                single_static_position(new_cls_positions))
    source = gather_index(index, cls_positions, new_cls_positions)
    return batch_gather(hidden, source), batch_gather(residual, source), slot_to_patch.gather(1, index)


class _PermuteTokens(torch.autograd.Function):
    """x (B, L, C), source (B, L) a permutation of 0..L-1 per sample -> x[b, source[b, i]]. The backward is the
    gather by the inverse permutation: no zero-filled gradient, no scatter-add (atomics, emulated for bf16),
    the same values (every row receives exactly one gradient row)."""

    @staticmethod
    def forward(ctx, x: Tensor, source: Tensor):
        ctx.save_for_backward(source)
        return batch_gather(x, source)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (source,) = ctx.saved_tensors
        rows = torch.arange(source.shape[1], device=source.device).expand_as(source)
        return batch_gather(grad, torch.empty_like(source).scatter_(1, source, rows)), None


def permute_tokens(x: Tensor, source: Tensor) -> Tensor:
    """x (B, L, C) reordered by a per-sample permutation source (B, L): x[b, source[b, i]]."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _PermuteTokens.apply(x, source)
    return batch_gather(x, source)


def gather_tokens(x: Tensor, index: Tensor, cls_positions: ClsPositions,
                  new_cls_positions: ClsPositions) -> Tensor:
    """x (B, N+n, C) with the class tokens at cls_positions, index (B, k) of patch slots to keep
    -> (B, k+n, C): those tokens in index order, the class tokens at new_cls_positions. One gather, no concat."""
    return batch_gather(x, gather_index(index, cls_positions, new_cls_positions))


def cls_columns_mean(xz: Tensor, cls_positions: ClsPositions) -> Tensor:
    """xz (B, C, L), channels first -> (B, C): the column of the class token, or the mean of the columns of
    several class tokens (MambaReg's gates read the mean over its registers)."""
    if is_static(cls_positions):
        pos = _static(cls_positions)
        if len(pos) == 1:
            return xz[:, :, pos[0]]
        return torch.stack([xz[:, :, p] for p in pos], dim=-1).mean(-1)
    pos = _per_sample(cls_positions)
    cols = xz.gather(2, pos.unsqueeze(1).expand(-1, xz.shape[1], -1))
    return cols.squeeze(2) if pos.shape[1] == 1 else cols.mean(-1)


class _TapClsColumns(torch.autograd.Function):
    """(xz, cls_positions) -> (xz, cls_columns_mean(xz, cls_positions)) as one autograd node, so the columns'
    gradient is added into the gradient of xz in place. Read with indexing, xz would have two consumers: the
    read's backward builds a full-size zero tensor holding the columns and autograd adds it to the other
    consumer's gradient, a (B, 2 d_inner, L) add across memory layouts per layer (6 ms of a DyVM-S bf16
    training step at batch 128 on an H200). The sums are the same: each class column gets its own gradient
    plus dcols / n, once. dxz arrives as a tensor built for this node (xz's consumers, the split into x and z
    and slices, each make a fresh gradient), so adding into it is safe."""

    @staticmethod
    def forward(ctx, xz: Tensor, cls_positions: ClsPositions):
        ctx.positions = cls_positions if is_static(cls_positions) else None
        if not is_static(cls_positions):
            ctx.save_for_backward(_per_sample(cls_positions))
        ctx.xz_meta = (xz.shape, xz.stride(), xz.dtype, xz.device)
        return xz.view_as(xz), cls_columns_mean(xz, cls_positions)

    @staticmethod
    def backward(ctx, dxz: Tensor, dcols: Tensor):
        if dcols is None:
            return dxz, None
        if dxz is None:
            shape, stride, dtype, device = ctx.xz_meta
            dxz = torch.empty_strided(shape, stride, dtype=dtype, device=device).zero_()
        if ctx.positions is not None:  # the same columns for every sample (no index tensor: capturable)
            positions = _static(ctx.positions)
            per_column = dcols if len(positions) == 1 else dcols / len(positions)
            for p in positions:
                dxz[:, :, p] += per_column
            return dxz, None
        (index,) = ctx.saved_tensors
        n = index.shape[1]
        per_column = (dcols if n == 1 else dcols / n).unsqueeze(2).expand(-1, -1, n)
        return dxz.scatter_add_(2, index.unsqueeze(1).expand(-1, dxz.shape[1], -1), per_column), None


def tap_cls_columns(xz: Tensor, cls_positions: ClsPositions) -> Tuple[Tensor, Tensor]:
    """xz (B, C, L) -> (xz, cls_columns_mean(xz, cls_positions)); with autograd, xz is returned through one
    node with the columns (_TapClsColumns): use the returned xz from here on."""
    if not torch.is_grad_enabled() or not xz.requires_grad:
        return xz, cls_columns_mean(xz, cls_positions)
    return _TapClsColumns.apply(xz, cls_positions)


def kept_first_order(policy: Tensor) -> Tensor:
    """policy (B, N) -> permutation (B, N): kept slots in their current order, then pruned ones in theirs.

    A stable sort on "is pruned" does it for the whole batch at once (no loop over samples).
    """
    return torch.sort((policy <= 0.5).to(torch.int8), dim=1, stable=True).indices


def sorted_topk(score: Tensor, k: int) -> Tensor:
    """score (B, N) -> indices (B, k) of the k largest, in ascending slot order (so original order is kept).

    Equal scores at the k-th place resolve to the lower slots, as torch.topk's CUDA kernel resolves them (its
    CPU kernel does not): a stable descending sort, so every device keeps the same tokens (bf16 scores tie often),
    and so does the inference kernel (mamba_ssm.ops.triton.pruning_stage.select_top_k)."""
    return torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k].sort(dim=1).values


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

    g1, g2 ~ Gumbel(0, 1); noise=False drops them (deterministic training decisions). Their difference is a
    Logistic(0, 1) draw, drawn as logit(u) for u ~ U(0, 1): two ops, where the reference's two Gumbel draws
    (-log of an exponential each, then their difference) took six a layer. u is kept in [2^-24, 1 - 2^-24] (a draw
    of exactly 0 would give -inf).
    """
    if noise:
        logits = logits + torch.logit(torch.rand_like(logits), eps=2.0 ** -24)
    soft = torch.sigmoid(logits / tau)
    return straight_through((soft > threshold).to(soft.dtype), soft)


# ---- keep-set selection rules (the pruning ablations) ----------------------------------------------------
# Each rule gives, per stage: in training a (B, N) 0/1 keep over the current slots (cumulative: a pruned slot
# stays pruned), at inference the sorted indices of the k slots to keep. `policy` (B, N) is the current keep;
# by construction the kept slots come first in training, and every slot is kept at inference (policy all ones).
# `log_probs` (B, N, 2) is the predictor's output, None for the rules without a predictor.


class _Selection:
    """What every rule has: an inference stage's choice from its eval_indices."""

    def eval_indices(self, log_probs: Optional[Tensor], policy: Tensor, k: int) -> Tensor:
        raise NotImplementedError

    def eval_select(self, log_probs: Optional[Tensor], policy: Tensor, slot_to_patch: Tensor, k: int,
                    num_patches: int, kernel_streams: Tuple) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """An inference stage's choice of k slots -> (index (B, k) of the kept slots, ascending; the next policy
        (B, k), ones; the decision (B, num_patches) over the original patches, or None for the caller to build
        from the kept slots' patches). kernel_streams: (hidden, residual, class positions before and after), for
        the rules that have a kernel (stage_kernels_apply)."""
        index = self.eval_indices(log_probs, policy, k)
        return index, torch.ones(index.shape, device=index.device), None


class LearnedSelection(_Selection):
    """The DyVM rule: predictor log-probabilities; hard Gumbel-softmax in training, top-k at inference."""

    needs_predictor = True

    def __init__(self, gumbel_noise: bool = True):
        self.gumbel_noise = gumbel_noise

    def train_keep(self, log_probs: Tensor, policy: Tensor, k: int) -> Tensor:
        return gumbel_softmax_keep(log_probs, self.gumbel_noise) * policy

    def eval_indices(self, log_probs: Tensor, policy: Tensor, k: int) -> Tensor:
        return sorted_topk(log_probs[..., 0], k)

    def eval_select(self, log_probs, policy, slot_to_patch, k, num_patches, kernel_streams):
        """The top-k of the keep log-probabilities as one kernel on the GPU where the stage's kernels apply
        (mamba_ssm.ops.triton.pruning_stage.select_top_k: the same slots), else as the base rule does."""
        if not stage_kernels_apply(*kernel_streams):
            return super().eval_select(log_probs, policy, slot_to_patch, k, num_patches, kernel_streams)
        from mamba_ssm.ops.triton.pruning_stage import select_top_k

        index, decision, next_policy = select_top_k(log_probs[..., 0], slot_to_patch, k, num_patches)
        return index, next_policy, decision


class _ScoredSelection(_Selection):
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
