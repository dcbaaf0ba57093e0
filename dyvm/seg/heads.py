"""Decode heads (mmsegmentation's UPerHead and FCNHead, written on torch): feature pyramid -> class logits.

UPerHead (UperNet): a pyramid pooling module on the coarsest map (average pools to 1x1, 2x2, 3x3, 6x6 cells,
1x1 conv each, upsampled and concatenated with the map, 3x3 conv), 1x1 lateral convs on the other maps, a
top-down pathway adding each coarser map (bilinearly upsampled) to the next finer one, 3x3 convs, everything
upsampled to the finest map, concatenated, a 3x3 conv, dropout 0.1 and a 1x1 classifier. Its logits are at the
finest map's resolution (stride 4 with a patch-16 backbone).
FCNHead (the auxiliary head): one 3x3 conv block on one map, dropout 0.1, 1x1 classifier.
Every conv block is conv (no bias) -> BatchNorm -> ReLU, initialised as mmcv does (Kaiming normal, fan out).
"""
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class ConvBlock(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        super().__init__(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class Classifier(nn.Sequential):
    """Dropout -> 1x1 conv to class logits (weight N(0, 0.01), bias 0, as mmseg's cls_seg)."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        conv = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.zeros_(conv.bias)
        super().__init__(nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(), conv)


def resize(x: Tensor, size) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class PyramidPooling(nn.Module):
    """The PSP module: the map plus its average-pooled summaries at each scale, fused by a 3x3 conv block."""

    def __init__(self, in_channels: int, channels: int, pool_scales: Sequence[int]):
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBlock(in_channels, channels, 1))
                                    for s in pool_scales)
        self.bottleneck = ConvBlock(in_channels + len(pool_scales) * channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        pooled = [resize(stage(x), x.shape[2:]) for stage in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UPerHead(nn.Module):
    """Feature pyramid (finest first) -> logits (B, num_classes, H0, W0) at the finest map's size."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        in_channels = list(in_channels)
        self.psp = PyramidPooling(in_channels[-1], channels, pool_scales)
        self.lateral_convs = nn.ModuleList(ConvBlock(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBlock(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvBlock(len(in_channels) * channels, channels, 3)
        self.classifier = Classifier(channels, num_classes, dropout)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)] + [self.psp(inputs[-1])]
        for i in range(len(laterals) - 1, 0, -1):  # top-down: coarser maps refine the finer ones
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [resize(o, size) for o in outs[1:]], dim=1))
        return self.classifier(fused)


class FCNHead(nn.Module):
    """The auxiliary head: one map -> logits at that map's size."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.conv = ConvBlock(in_channels, channels, 3)
        self.classifier = Classifier(channels, num_classes, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.conv(x))
