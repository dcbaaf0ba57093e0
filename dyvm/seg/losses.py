"""The segmentation loss: pixel cross-entropy of the decode and auxiliary heads plus DyVM's ratio losses.

    loss = CE(logits) + w_aux * CE(aux_logits) + w_tok * L_tok / S + w_blk * L_blk

CE ignores label 255 and averages over the labelled pixels (torch's rule; mmseg 0.x divided by every pixel,
ignored ones included). L_tok and L_blk are the classifier's (dyvm.losses): per stage the squared gap between
the mean kept fraction and its target, and the squared gap between the mean gate and the block keep target.
No distillation (the authors use none for segmentation). The authors hard-coded w_tok = w_blk = 20 and the
block target 0.8 in the backbone; here they are options with those defaults.
"""
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from dyvm.losses import block_ratio_loss, token_ratio_loss
from dyvm.seg.segmentor import SegOutput

IGNORE_INDEX = 255
LOSS_PARTS = ("decode_loss", "aux_loss", "token_pruning_loss", "block_pruning_loss")


class SegLoss(nn.Module):
    def __init__(self, token_keep_ratios: Sequence[float] = (), block_keep_ratio: float = 0.8,
                 aux_weight: float = 0.4, token_weight: float = 20.0, block_weight: float = 20.0):
        super().__init__()
        self.token_keep_ratios = tuple(float(r) for r in token_keep_ratios)
        self.block_keep_ratio = float(block_keep_ratio)
        self.aux_weight, self.token_weight, self.block_weight = aux_weight, token_weight, block_weight

    @classmethod
    def from_model(cls, model: nn.Module, **weights) -> "SegLoss":
        """Targets from the backbone's own DyVM config, so the loss and the pruning cannot disagree."""
        cfg = model.backbone.dyvm_cfg
        if cfg.pruning != "learned":  # random / static decisions learn nothing: a constant term
            weights["token_weight"] = 0.0
        return cls(cfg.token_keep_ratios[:cfg.num_stages], cfg.block_keep_ratio, **weights)

    def forward(self, out: SegOutput, masks: Tensor):
        zero = out.logits.new_zeros((), dtype=torch.float32)
        decode = F.cross_entropy(out.logits.float(), masks, ignore_index=IGNORE_INDEX)
        aux = zero
        if out.aux_logits is not None and self.aux_weight:
            aux = self.aux_weight * F.cross_entropy(out.aux_logits.float(), masks, ignore_index=IGNORE_INDEX)
        token, block = zero, zero
        decisions, gates = out.backbone.decisions, out.backbone.gates
        if decisions and self.token_weight:
            stages = len(decisions)
            token = self.token_weight * token_ratio_loss(decisions, self.token_keep_ratios[:stages]) / stages
        if gates is not None and self.block_weight:
            block = self.block_weight * block_ratio_loss(gates, self.block_keep_ratio)
        terms = (decode, aux, token, block)
        total = sum(terms)
        if not torch.isfinite(total):
            bad = [n for n, v in zip(LOSS_PARTS, terms) if not torch.isfinite(v)]
            raise FloatingPointError(f"non-finite loss term(s) {bad}")
        return total, {n: v.detach() for n, v in zip(LOSS_PARTS, terms)}
