"""Where a backbone keeps its class token(s): the one point in which Vim, VideoMamba and MambaReg differ for DyVM.

A layout maps "a sequence whose first `count` patch tokens are the kept ones" to the positions of its class
tokens. The same rule places them in the dense sequence (count = all patches), after each pruning stage at
inference (count = k, the sequence holds only the kept tokens) and in training (count = each image's own number
of kept tokens; the pruned ones sit masked behind them). Everything else is shared: the class tokens are split
off before the predictor scores the patches (they are never scored or pruned), the gate reads the mean of their
columns of in_proj's output (one column for a single class token), and the head reads them in position order.

  MiddleClassToken (Vim):        one class token in the middle of the kept patches, count // 2.
  FirstClassToken (VideoMamba):  one class token prepended, always at 0.
  SpreadRegisters(n) (MambaReg): n registers, one after every i = count // (n+1) kept patches, at
                                 (i+1)(j+1) - 1 for j < n; the remaining count - n*i patches follow the last one.

`positions(count)` takes an int (-> a tuple of n ints, the same for every image) or a (B,) LongTensor of
per-image counts (-> (B, n)); both forms are what dyvm.pruning's split_cls / insert_cls take.
"""
from typing import Union

import torch
from torch import Tensor

Count = Union[int, Tensor]


class TokenLayout:
    num_tokens = 1

    def positions(self, count: Count):
        raise NotImplementedError


class MiddleClassToken(TokenLayout):
    """Vim: the class token in the middle of the kept patch tokens."""

    def positions(self, count: Count):
        return (count // 2,) if isinstance(count, int) else (count // 2).unsqueeze(-1)


class FirstClassToken(TokenLayout):
    """VideoMamba: the class token first, where it stays after every pruning stage."""

    def positions(self, count: Count):
        return (0,) if isinstance(count, int) else torch.zeros_like(count).unsqueeze(-1)


class SpreadRegisters(TokenLayout):
    """MambaReg: n registers spread evenly among the kept patch tokens, re-spread after every stage."""

    def __init__(self, num_tokens: int):
        if num_tokens < 1:
            raise ValueError(f"need at least one register, got {num_tokens}")
        self.num_tokens = num_tokens

    def positions(self, count: Count):
        n = self.num_tokens
        if isinstance(count, int):
            step = count // (n + 1) + 1
            return tuple(step * (j + 1) - 1 for j in range(n))
        step = (count // (n + 1) + 1).unsqueeze(-1)
        return step * torch.arange(1, n + 1, device=count.device) - 1


CLS_POSITIONS = ("middle", "first", "registers")


def make_layout(cls_position: str, num_cls_tokens: int) -> TokenLayout:
    """The layout named by a backbone config: 'middle' (Vim), 'first' (VideoMamba), 'registers' (MambaReg)."""
    if cls_position not in CLS_POSITIONS:
        raise ValueError(f"cls_position must be one of {CLS_POSITIONS}, got {cls_position!r}")
    if cls_position == "registers":
        return SpreadRegisters(num_cls_tokens)
    if num_cls_tokens != 1:
        raise ValueError(f"cls_position={cls_position!r} has one class token, got num_cls_tokens={num_cls_tokens} "
                         "(several class tokens need cls_position='registers')")
    return MiddleClassToken() if cls_position == "middle" else FirstClassToken()
