"""The authors' neck: one plain-ViT feature map per out index -> four scales, as a feature pyramid.

The four maps (all at stride `patch_size`) become strides patch/4, patch/2, patch and 2*patch:
  fpn1: ConvTranspose(2, 2) -> BatchNorm -> GELU -> ConvTranspose(2, 2)   (4x up)
  fpn2: ConvTranspose(2, 2)                                               (2x up)
  fpn3: identity
  fpn4: MaxPool(2, 2)                                                     (2x down)
BatchNorm becomes SyncBatchNorm under multi-GPU training (dyvm.seg.segmentor.to_sync_batchnorm).
"""
from typing import Sequence

import torch.nn as nn
from torch import Tensor


class MultiScaleNeck(nn.Module):
    """Four (B, D, g, g) maps -> (B, D, 4g, 4g), (B, D, 2g, 2g), (B, D, g, g), (B, D, g/2, g/2)."""

    num_outputs = 4

    def __init__(self, dim: int):
        super().__init__()
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2), nn.BatchNorm2d(dim),
                                  nn.GELU(), nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
        self.fpn2 = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, features: Sequence[Tensor]) -> list:
        if len(features) != self.num_outputs:
            raise ValueError(f"the neck takes {self.num_outputs} feature maps (one per out index), got "
                             f"{len(features)}")
        return [op(f) for op, f in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), features)]
