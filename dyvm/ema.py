"""The model EMA of training: timm's ModelEmaV3 with its per-step host work cut.

timm's update builds both state dicts on every step (two walks over every module) to pair the EMA's tensors with
the model's, then launches one foreach lerp. A graphed training step waits for the host there, after the step's
non-finite check: on an H200 at batch 128 (bf16, benchmarks/results/train_ema_h200_2026-11-27j.txt) the update took
2.5 ms of host time for Vim-S and 2.8 for DyVM-S, about 4% of a step, while the GPU had nothing to run.

`ModelEma` pairs the tensors once and keeps the lists while the model's parameters are the same tensors (a check
of their data pointers per step; moving or re-creating parameters rebuilds the pairs). The update itself is
timm's: the same foreach lerp over the same tensors in the same order, so the EMA is bit for bit timm's.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.utils import ModelEmaV3


class ModelEma(ModelEmaV3):
    """ModelEmaV3 (same arguments and state) whose update reuses the pairing of EMA and model tensors."""

    def __init__(self, model: nn.Module, **kwargs):
        super().__init__(model, **kwargs)
        self._pairs: Optional[Tuple[list, list, list, list]] = None
        self._pointers: Optional[List[int]] = None  # the model parameters' data pointers when paired

    def _paired(self, model: nn.Module):
        """(EMA floats, model floats, EMA others, model others) in state-dict order, rebuilt when the model's
        parameters are not the tensors they were (the EMA module's own tensors only change in place)."""
        pointers = [p.data_ptr() for p in model.parameters()]
        if self._pairs is None or pointers != self._pointers:
            floats_e, floats_m, others_e, others_m = [], [], [], []
            for ema_v, model_v in zip(self.module.state_dict().values(), model.state_dict().values()):
                (floats_e if ema_v.is_floating_point() else others_e).append(ema_v)
                (floats_m if ema_v.is_floating_point() else others_m).append(model_v)
            self._pairs, self._pointers = (floats_e, floats_m, others_e, others_m), pointers
        return self._pairs

    @torch.no_grad()
    def apply_update_(self, model: nn.Module, decay: float):
        if not self.foreach:  # (an EMA on another device: timm's per-tensor path)
            return super().apply_update_(model, decay)
        floats_e, floats_m, others_e, others_m = self._paired(model)
        for ema_v, model_v in zip(others_e, others_m):
            ema_v.copy_(model_v)
        foreach_lerp = getattr(self, "_foreach_lerp_", None)  # (timm releases before it lerp directly)
        if foreach_lerp is not None:
            foreach_lerp(floats_e, floats_m, weight=1.0 - decay)
        else:
            torch._foreach_lerp_(floats_e, floats_m, weight=1.0 - decay)
