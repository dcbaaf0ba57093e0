"""The token-score predictor (docs/reference.md section 2; the authors call it PredictorLG).

Module names (in_conv.0/1, out_conv.0/2/4) follow the authors' state-dict layout so their files load.
"""
import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from torch import Tensor


class TokenScorePredictor(nn.Module):
    """Patch features (B, N, C) and policy (B, N, 1) -> log-probabilities (B, N, 2) of [keep, drop].

    Each token sees its own first half of channels and a policy-weighted mean of the second half over the
    kept tokens; the mean divides by (number kept + 1), as the authors' code does.
    """

    def __init__(self, dim: int):
        super().__init__()
        if dim % 4:
            raise ValueError(f"predictor width {dim} must be a multiple of 4")
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                      nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, policy: Tensor) -> Tensor:
        x = self.in_conv(x)
        half = x.shape[-1] // 2
        local, pooled = x[..., :half], x[..., half:]
        pooled = (pooled * policy).sum(1, keepdim=True) / (policy.sum(1, keepdim=True) + 1)
        return self.out_conv(torch.cat([local, pooled.expand_as(local)], dim=-1))
