"""AdamW with layer-wise learning-rate decay and the poly schedule with linear warm-up (BEiT/mmseg recipe).

Layer ids over a backbone of depth L: position and patch embeddings 0, layer i (its gate head included) i + 1,
everything else (neck, heads, token predictors: newly initialised) L + 1. A parameter of layer id l trains with
lr x decay^(L + 1 - l). No weight decay on biases, 1-D parameters (norms, the SSM's D) and the position
embedding; the SSM's A_log (2-D) decays, as in the authors' constructor and in the classifier's timm rule.

Schedule, per iteration it (0-based, the update about to be made), as mmcv's poly policy with linear warm-up:
    factor(it) = (1 - it / max_iters) ^ power                          (lr = (base - min_lr) x factor + min_lr)
    times (1 - (1 - warmup_ratio) x (1 - it / warmup_iters))           while it < warmup_iters
The schedule is a pure function of the iteration, so a resumed run needs only the iteration number.
"""
from typing import Optional

import torch
import torch.nn as nn

_EMBEDDINGS = ("backbone.pos_embed", "backbone.patch_embed.")


def layer_id(name: str, depth: int) -> int:
    if name.startswith(_EMBEDDINGS):
        return 0
    if name.startswith("backbone.layers."):
        return int(name.split(".")[2]) + 1
    return depth + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list:
    """One group per (layer id, decayed or not), each with its 'lr_scale'."""
    depth = len(model.backbone.layers)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name.endswith(".bias") or name == "backbone.pos_embed"
        lid = layer_id(name, depth)
        key = (lid, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": layer_decay ** (depth + 1 - lid), "layer_id": lid}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, layer_decay: float,
                    betas=(0.9, 0.999)) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay, layer_decay)
    for g in groups:
        g["base_lr"] = lr * g["lr_scale"]
        g["lr"] = g["base_lr"]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)


class PolySchedule:
    """Sets every group's lr for an iteration: (base_lr - min_lr) x factor + min_lr (warm-up scales the poly lr)."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_iters: int, power: float = 1.0, warmup_iters: int = 0,
                 warmup_ratio: float = 1e-6, min_lr: float = 0.0):
        self.optimizer, self.max_iters, self.power = optimizer, max_iters, power
        self.warmup_iters, self.warmup_ratio, self.min_lr = warmup_iters, warmup_ratio, min_lr

    def lrs(self, it: int) -> list:
        poly = (1 - min(it, self.max_iters) / self.max_iters) ** self.power
        warm = 1.0 if it >= self.warmup_iters else 1 - (1 - self.warmup_ratio) * (1 - it / self.warmup_iters)
        return [((g["base_lr"] - self.min_lr) * poly + self.min_lr) * warm for g in self.optimizer.param_groups]

    def step(self, it: int) -> Optional[float]:
        """Set the lrs for iteration `it`; returns the heads' lr (the largest)."""
        lrs = self.lrs(it)
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr
        return max(lrs) if lrs else None
