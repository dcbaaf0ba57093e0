"""The Vim / DyVM backbone for dense prediction: feature maps instead of a class prediction.

Differences from the classifier (dyvm.models.dyvm.DyVM, whose pieces this reuses: the token-score predictors,
the keep-set selection rules, the gate heads and the gated, masked bidirectional scan):
- no class token: the sequence is the patch grid in raster order, with a position embedding for that grid;
  no final norm and no head;
- the mixer outputs after the layers in `out_indices` (default the last layer of each quarter: 5/11/17/23 at
  depth 24) are returned as (B, D, grid, grid) maps (feature_source="mixer", the authors'; "stream" returns the
  residual stream after the layer instead, mixer output included: Vim's use_residual_as_feature);
- a pruned token does not vanish from the maps: it keeps the feature it had when it was dropped (the mixer
  output of the layer just before its pruning stage), frozen, at its own grid position;
- the gate head of each layer reads the mean of the in_proj output over the tokens the layer processes
  (there is no class token to read). The mean is over the kept tokens in both modes; the authors divided by
  (kept + 1) in training and by kept at inference, so their two modes gated on different inputs.

Training keeps the full length (kept tokens first, in raster order, pruned ones masked out of the scans);
inference gathers the kept tokens so the sequence physically shrinks. For the same decisions both give the
same feature maps (tests/seg/test_backbone.py), as in the classifier.
"""
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from torch import Tensor

import dyvm.models.dyvm as dyvm_model
from dyvm.models.dyvm import DyVM, DyVMConfig
from dyvm.models.vim import VimConfig
from dyvm.pruning import batch_gather, indices_to_mask, keep_count, kept_first_order, to_original_order
from mamba_ssm.ops.linear_fp32 import LiveRows

# A dense Vim is the same module tree without predictors and gate heads.
DENSE = DyVMConfig(pruning="none", block_selection=False)
FEATURE_SOURCES = ("mixer", "stream")


def default_out_indices(depth: int) -> tuple:
    """(5, 11, 17, 23) at depth 24: the last layer of each quarter; the same quarters of a smaller depth."""
    return tuple(max(0, round(depth * s / 4) - 1) for s in (1, 2, 3)) + (depth - 1,)


@dataclass
class SegBackboneOutput:
    """features: per out index, (B, D, grid, grid) maps with every patch at its grid position.
    decisions: per pruning stage, (B, M) cumulative 0/1 keep over the raster-order patches (training:
    straight-through, carries gradients). gates: (depth, B, 2) [forward, backward] or None (dense).
    seq_lens: per layer, the number of tokens it processed (training: always M)."""

    features: list
    decisions: list
    gates: Optional[Tensor]
    seq_lens: list


class _Tokens(NamedTuple):
    """policy (B, S): 1 where a slot holds a kept token; slot_to_patch (B, S): raster index of each slot;
    mask (B, S) for the scans (training after a pruning stage) or None (every slot kept); scan_lengths (B,) int32:
    each image's kept count, where its scans stop (training; dyvm.models.dyvm.SCAN_KEPT_ONLY); live_rows: the rows
    the mixers' fp32 out_proj computes (dyvm.models.dyvm.LINEAR_KEPT_ONLY; in_proj computes every row: the gate
    pools xz over the kept rows with the mask, whose gradient at a pruned row reads that row's xz)."""
    policy: Tensor
    slot_to_patch: Tensor
    mask: Optional[Tensor]
    scan_lengths: Optional[Tensor] = None
    live_rows: Optional[LiveRows] = None


def scatter_tokens(values: Tensor, slot_to_patch: Tensor, num_patches: int) -> Tensor:
    """values (B, S, C) per slot -> (B, num_patches, C) at their patches, zeros elsewhere. Keeps gradients."""
    index = slot_to_patch.unsqueeze(-1).expand(-1, -1, values.shape[-1])
    return values.new_zeros(values.shape[0], num_patches, values.shape[-1]).scatter(1, index, values)


def pooled_gate_input(xz: Tensor, mask: Optional[Tensor]) -> Tensor:
    """xz (B, 2*d_inner, L) -> (B, 2*d_inner): its mean over the kept tokens (mask (B, L), None = all)."""
    if mask is None:
        return xz.mean(-1)
    weights = mask.to(xz.dtype).unsqueeze(1)
    return (xz * weights).sum(-1) / weights.sum(-1).clamp(min=1)


class SegBackbone(DyVM):
    """Dense Vim (dyvm_cfg=DENSE) or DyVM backbone for segmentation; forward(images) -> SegBackboneOutput."""

    def __init__(self, cfg: VimConfig, dyvm_cfg: DyVMConfig = DENSE, out_indices: Optional[Sequence[int]] = None,
                 feature_source: str = "mixer"):
        if feature_source not in FEATURE_SOURCES:
            raise ValueError(f"feature_source must be one of {FEATURE_SOURCES}, got {feature_source!r}")
        if dyvm_cfg.predictor_input != "residual":
            raise ValueError("the segmentation backbone's predictors read the residual stream only "
                             f"(predictor_input='residual'), got {dyvm_cfg.predictor_input!r}")
        super().__init__(cfg.updated(num_classes=0), dyvm_cfg)
        out_indices = tuple(int(i) for i in (default_out_indices(cfg.depth) if out_indices is None else out_indices))
        if not out_indices or list(out_indices) != sorted(set(out_indices)) or not 0 <= out_indices[0] \
                or out_indices[-1] >= cfg.depth:
            raise ValueError(f"out_indices {out_indices} must be strictly increasing layer indices in "
                             f"[0, {cfg.depth - 1}]")
        self.out_indices = out_indices
        self.feature_source = feature_source
        # no class token and no final norm (the head is already an empty Identity): a state dict holds only
        # what the forward uses
        del self.cls_token, self.norm_f
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.embed_dim))
        trunc_normal_(self.pos_embed, std=0.02)

    @property
    def is_dynamic(self) -> bool:
        return self.dyvm_cfg.num_stages > 0 or self.dyvm_cfg.block_selection

    def no_weight_decay(self):
        return {"pos_embed"}

    def forward_aux(self, x):
        raise TypeError("a segmentation backbone returns feature maps: call it, model(images) -> SegBackboneOutput")

    def forward_with_tokens(self, x):
        raise TypeError("a segmentation backbone returns feature maps: call it, model(images) -> SegBackboneOutput")

    def _restore(self, hidden: Tensor, tokens: _Tokens, frozen: Optional[Tensor]) -> Tensor:
        """Tokens (B, S, D) in slot order -> (B, D, grid, grid): kept tokens at their patches, frozen elsewhere."""
        if frozen is not None:
            if tokens.mask is not None:  # training: pruned slots hold stale values; the policy zeroes them
                hidden = hidden * tokens.policy.unsqueeze(-1).to(hidden.dtype)
            hidden = scatter_tokens(hidden, tokens.slot_to_patch, self.cfg.num_patches) + frozen
        g = self.cfg.grid_size
        return hidden.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[2], g, g)

    def _feature(self, hidden: Tensor, residual: Tensor) -> Tensor:
        """What a layer contributes to the maps: its mixer output, or the residual stream after it."""
        return hidden if self.feature_source == "mixer" else hidden + residual.to(hidden.dtype)

    def _prune(self, stage: int, hidden: Tensor, residual: Tensor, tokens: _Tokens, frozen: Optional[Tensor]):
        """One pruning stage -> (hidden, residual, tokens, frozen, decision (B, M) over the raster patches).
        A dropped token's frozen feature is what the maps showed for it after the previous layer."""
        M = self.cfg.num_patches
        k = keep_count(self.dyvm_cfg.token_keep_ratios[stage], M)
        log_probs = None
        if self.score_predictors is not None:
            features = hidden + residual
            log_probs = self.score_predictors[stage](features, tokens.policy.unsqueeze(-1).to(features.dtype))
        feature = self._feature(hidden, residual)
        if frozen is None:
            frozen = feature.new_zeros(feature.shape[0], M, feature.shape[2])
        if not self.training:  # the sequence shrinks to the k best tokens, still in raster order
            index = self.selection.eval_indices(log_probs, tokens.policy, k)
            dropped = 1 - indices_to_mask(index, hidden.shape[1])
            frozen = frozen + scatter_tokens(feature * dropped.unsqueeze(-1).to(feature.dtype), tokens.slot_to_patch, M)
            slot_to_patch = tokens.slot_to_patch.gather(1, index)
            tokens = _Tokens(torch.ones(index.shape, device=index.device), slot_to_patch, None)
            return (batch_gather(hidden, index), batch_gather(residual, index), tokens, frozen,
                    indices_to_mask(slot_to_patch, M))
        # training: full length, kept tokens first (raster order), pruned ones masked out of the scans
        keep = self.selection.train_keep(log_probs, tokens.policy, k)
        newly_dropped = (tokens.policy - keep).unsqueeze(-1).to(feature.dtype)  # 0/1 (straight-through)
        frozen = frozen + scatter_tokens(feature * newly_dropped, tokens.slot_to_patch, M)
        decision = to_original_order(keep, tokens.slot_to_patch, M)
        order = kept_first_order(keep)
        policy = keep.gather(1, order)
        lengths = (policy > 0.5).sum(1).to(torch.int32) if dyvm_model.SCAN_KEPT_ONLY else None
        live_rows = LiveRows(lengths) if lengths is not None and dyvm_model.LINEAR_KEPT_ONLY else None
        tokens = _Tokens(policy, tokens.slot_to_patch.gather(1, order), policy, lengths, live_rows)
        return batch_gather(hidden, order), batch_gather(residual, order), tokens, frozen, decision

    def forward(self, x: Tensor) -> SegBackboneOutput:
        M = self.cfg.num_patches
        hidden = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        residual, frozen = None, None
        batch = hidden.shape[0]
        tokens = _Tokens(hidden.new_ones(batch, M, dtype=torch.float32),
                         torch.arange(M, device=x.device).expand(batch, M), None)
        stage_at = self.stage_at
        features, decisions, gates, seq_lens = [], [], [], []
        for i, layer in enumerate(self.layers):
            if i in stage_at:
                hidden, residual, tokens, frozen, decision = self._prune(stage_at[i], hidden, residual, tokens, frozen)
                decisions.append(decision)
            normed, residual = layer.add_norm(hidden, residual)
            mixer = layer.mixer
            xz = mixer.in_proj_xz(normed)  # (every row: the gate's mean over kept rows has a mask gradient there)
            gate = None
            if mixer.block_head is not None:
                gate = self._decide_gate(mixer.block_head(pooled_gate_input(xz, tokens.mask)))
                gates.append(gate)
            hidden = mixer.mix(xz, gate=gate, mask=tokens.mask, lengths=tokens.scan_lengths, live_rows=tokens.live_rows)
            seq_lens.append(hidden.shape[1])
            if i in self.out_indices:
                features.append(self._restore(self._feature(hidden, residual), tokens, frozen))
        return SegBackboneOutput(features, decisions, torch.stack(gates) if gates else None, seq_lens)
