"""The segmentation model: backbone -> neck -> UPerHead (+ FCN auxiliary head in training), its factory, slide
inference, and the BatchNorm -> SyncBatchNorm switch for multi-GPU training.

    model = build_segmentor("dyvm_vim_tiny", num_classes=150, img_size=512, token_keep_ratio=0.9)
    out = model(images)            # SegOutput: logits at the input size (+ auxiliary logits in training)
    logits = slide_inference(model.eval(), images, crop_size=512, stride=341)   # any image size

Names: vim_{tiny,small,base} build a dense Vim backbone, dyvm_vim_* and the authors' Vim-Tiny/-Small/-Base a
DyVM backbone (token pruning and block selection).
"""
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from dyvm.models.dyvm import make_dyvm_config
from dyvm.models.registry import resolve
from dyvm.seg.backbone import DENSE, SegBackbone, SegBackboneOutput, default_out_indices
from dyvm.seg.heads import FCNHead, UPerHead, resize
from dyvm.seg.neck import MultiScaleNeck

SEG_BLOCK_KEEP_RATIO = 0.8  # the authors' segmentation backbone targets 0.8 of the scan directions
AUX_INDEX = 2  # the FCN auxiliary head reads the third pyramid level (stride = patch size)


@dataclass
class SegOutput:
    """logits (B, num_classes, H, W) at the input size; aux_logits the same from the auxiliary head (training
    only, else None); backbone: what the backbone ran (decisions, gates, sequence lengths)."""
    logits: Tensor
    aux_logits: Optional[Tensor]
    backbone: SegBackboneOutput


class Segmentor(nn.Module):
    def __init__(self, backbone: SegBackbone, decode_channels: int, num_classes: int, aux_channels: int = 256,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), aux_head: bool = True):
        super().__init__()
        if len(backbone.out_indices) != MultiScaleNeck.num_outputs:
            raise ValueError(f"UperNet needs {MultiScaleNeck.num_outputs} out_indices, got {backbone.out_indices}")
        dim = backbone.cfg.embed_dim
        self.num_classes = num_classes
        self.backbone = backbone
        self.neck = MultiScaleNeck(dim)
        self.decode_head = UPerHead([dim] * 4, decode_channels, num_classes, pool_scales)
        self.auxiliary_head = FCNHead(dim, aux_channels, num_classes) if aux_head else None

    @property
    def img_size(self) -> int:
        return self.backbone.cfg.img_size

    def decode(self, features: Sequence[Tensor], size) -> Tensor:
        """Backbone feature maps -> logits (B, num_classes, *size) (the part of the model after the backbone)."""
        return resize(self.decode_head(self.neck(features)), size)

    def forward(self, images: Tensor) -> SegOutput:
        out = self.backbone(images)
        pyramid = self.neck(out.features)
        logits = resize(self.decode_head(pyramid), images.shape[2:])
        aux = None
        if self.training and self.auxiliary_head is not None:
            aux = resize(self.auxiliary_head(pyramid[AUX_INDEX]), images.shape[2:])
        return SegOutput(logits, aux, out)


def build_segmentor(name: str, *, num_classes: int, img_size: int = 512, patch_size: Optional[int] = None,
                    depth: Optional[int] = None, embed_dim: Optional[int] = None, d_state: Optional[int] = None,
                    drop_path_rate: float = 0.0, out_indices: Optional[Sequence[int]] = None,
                    decode_channels: Optional[int] = None, aux_channels: int = 256,
                    pool_scales: Sequence[int] = (1, 2, 3, 6), aux_head: bool = True,
                    pruning_loc: Optional[Sequence[int]] = None, feature_source: str = "mixer",
                    **dyvm_options) -> Segmentor:
    """The one factory of segmentation models. dyvm_options (DyVM names only): token_keep_ratio (r -> r, r^2,
    r^3) or token_keep_ratios, pruning, block_selection, gumbel_noise, block_keep_ratio. pruning_loc defaults
    to the layer after each of the first three out indices (6, 12, 18 at depth 24). decode_channels defaults to
    the embedding width (the authors' configs). feature_source: "mixer" (the authors') or "stream" (see
    dyvm.seg.backbone)."""
    spec = resolve(name)  # one-line UnknownModelError (a ValueError) for a name no family knows
    if spec.family.name != "Vim":
        raise ValueError(f"segmentation builds on Vim backbones (vim_*, dyvm_vim_*, Vim-*), as the authors' "
                         f"UperNet rows do; got {name!r}, a {spec.family.name}")
    dynamic = spec.dynamic
    overrides = dict(patch_size=patch_size, depth=depth, embed_dim=embed_dim, d_state=d_state)
    cfg = spec.family.sizes[spec.size].updated(img_size=img_size, num_classes=0, drop_path_rate=drop_path_rate,
                              **{k: v for k, v in overrides.items() if v is not None})
    out_indices = tuple(default_out_indices(cfg.depth) if out_indices is None else out_indices)
    if dynamic:
        if pruning_loc is None:
            pruning_loc = tuple(i + 1 for i in out_indices[:3])
        if dyvm_options.get("block_keep_ratio") is None:  # the authors' segmentation target (classification's is 0.7)
            dyvm_options["block_keep_ratio"] = SEG_BLOCK_KEEP_RATIO
        dyvm_cfg = make_dyvm_config(pruning_loc=pruning_loc, **dyvm_options)
    else:
        given = sorted(k for k, v in dyvm_options.items() if v is not None)
        if given or pruning_loc is not None:
            raise ValueError(f"{name} is a dense Vim: DyVM options {given or ['pruning_loc']} need a dyvm_vim_* name")
        dyvm_cfg = DENSE
    backbone = SegBackbone(cfg, dyvm_cfg, out_indices, feature_source)
    return Segmentor(backbone, decode_channels or cfg.embed_dim, num_classes, aux_channels, pool_scales, aux_head)


def dense_twin(model: Segmentor) -> Segmentor:
    """A dense segmentor of the same shape (random weights): the timing and MACs baseline of a DyVM one."""
    b = model.backbone
    twin = Segmentor(SegBackbone(b.cfg, DENSE, b.out_indices, b.feature_source),
                     model.decode_head.classifier[-1].in_channels, model.num_classes, aux_head=False,
                     pool_scales=[stage[0].output_size for stage in model.decode_head.psp.stages])
    return twin.to(next(model.parameters()).device)


def window_starts(length: int, crop: int, stride: int) -> list:
    """Start offsets of the sliding windows along one side (mmseg's rule: the last window ends at the border)."""
    count = max(length - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride, length - crop), 0) for i in range(count)})


@torch.no_grad()
def slide_inference(model: Segmentor, images: Tensor, crop_size: int, stride: int,
                    on_window: Optional[Callable[[SegOutput], None]] = None) -> Tensor:
    """Images (B, 3, H, W) of any size -> logits (B, num_classes, H, W): the mean of the logits of every
    crop_size window (stride apart) covering each pixel. Windows sticking out of a small image are padded with
    zeros (the mean colour after normalisation) and the padding is cut off again. on_window(SegOutput) sees each
    window's forward (for token and gate statistics)."""
    if stride < 1 or stride > crop_size:
        raise ValueError(f"slide stride must be in [1, crop size {crop_size}], got {stride}")
    b, _, h, w = images.shape
    logits = images.new_zeros(b, model.num_classes, h, w, dtype=torch.float32)
    count = images.new_zeros(1, 1, h, w, dtype=torch.float32)
    for y in window_starts(h, crop_size, stride):
        for x in window_starts(w, crop_size, stride):
            crop = images[:, :, y:y + crop_size, x:x + crop_size]
            ch, cw = crop.shape[2:]
            if (ch, cw) != (crop_size, crop_size):
                crop = F.pad(crop, (0, crop_size - cw, 0, crop_size - ch))
            out = model(crop)
            if on_window is not None:
                on_window(out)
            logits[:, :, y:y + ch, x:x + cw] += out.logits[:, :, :ch, :cw].float()
            count[:, :, y:y + ch, x:x + cw] += 1
    return logits / count


def to_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm -> SyncBatchNorm for multi-GPU training (statistics over the global batch, as the authors'
    SyncBN). SyncBatchNorm runs on CUDA only: CPU (gloo) processes keep per-process BatchNorm."""
    if torch.device(device).type != "cuda":
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
