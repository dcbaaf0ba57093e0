"""ForwardOutput: what a forward pass of any model here computed (dense Vim and DyVM, train and eval mode).

A module of its own so that the backbones (vim.py) and the DyVM wrapper (dyvm.py) both import it at the top:
the backbone returns the same type as the wrapper built on it.
"""
from dataclasses import dataclass
from typing import Optional

from torch import Tensor


@dataclass
class ForwardOutput:
    """What a forward pass computed; the same type in train and eval mode, for dense Vim and DyVM.

    logits (B, num_classes). patch_tokens (B, S, D): final-normed patch tokens in slot order (training
    DyVM: S = M, kept first; eval DyVM: S = k of the last stage; dense: original order). final_policy
    (B, S, 1): 1 where a slot holds a kept token. slot_to_patch (B, S): original patch index of each slot.
    decisions: per pruning stage, (B, M) cumulative 0/1 keep over the original patch order (training:
    straight-through, carries gradients). gates (depth, B, 2) [forward, backward] or None without block
    selection (training: straight-through; eval: 0/1 of what ran). seq_lens: per layer, the sequence length
    (class tokens included) it processed.
    """

    logits: Tensor
    patch_tokens: Tensor
    final_policy: Tensor
    slot_to_patch: Tensor
    decisions: list
    gates: Optional[Tensor]
    seq_lens: list
