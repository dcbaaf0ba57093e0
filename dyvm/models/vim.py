"""Vision Mamba (Vim) backbone as DyVM uses it (docs/reference.md, section 1), and its two variants (VideoMamba,
MambaReg).

Vim: 14x14 patch tokens with a class token inserted at index M//2, absolute position embedding added after
the insertion. Each layer: residual += drop_path(hidden) (fp32 residual stream), hidden = RMSNorm(residual),
hidden = bidirectional Mamba(hidden) with the two directions' sum halved. Then norm_f(residual + hidden) and
a linear head on the class token.

The same class builds VideoMamba and MambaReg, whose differences are options of VimConfig:
  VideoMamba: the class token first (cls_position="first"), the two directions summed without halving
              (divide_out=False).
  MambaReg:   n registers spread among the patches (cls_position="registers", num_cls_tokens=n), each with its
              own position embedding (cls_pos_embed: pos_embed then covers the patches only, added before the
              registers are inserted); the head reads every register: norm_f -> neck Linear(D, D/c) per register
              -> flatten -> norm_neck RMSNorm -> head (cls_reduce=c; c=1: no neck, as the official Mamba-R).
Where the class tokens sit is dyvm.models.layout's job; the presets are in dyvm.models.backbones.
"""
import math
from dataclasses import dataclass, fields, replace
from typing import Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, lecun_normal_, trunc_normal_

from dyvm.models.layout import make_layout
from dyvm.pruning import insert_cls, split_cls, take_cls
from dyvm.models.output import ForwardOutput
from mamba_ssm.modules.mamba_simple import Mamba, inference_weights_of
from mamba_ssm.ops.triton.layernorm import RMSNorm, rms_norm_fn


@dataclass(frozen=True)
class VimConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 192
    depth: int = 24
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-5
    divide_out: bool = True  # halve the sum of the two directions (Vim, MambaReg; VideoMamba does not)
    cls_position: str = "middle"  # "middle" (Vim), "first" (VideoMamba), "registers" (MambaReg): dyvm.models.layout
    num_cls_tokens: int = 1  # MambaReg's registers: 12 (16 for Large)
    cls_reduce: int = 1  # MambaReg's neck: each register Linear(D, D // cls_reduce) before the head; 1 = no neck
    cls_pos_embed: bool = False  # class tokens get their own pos_embed_cls; pos_embed covers the patches (MambaReg)

    def __post_init__(self):
        make_layout(self.cls_position, self.num_cls_tokens)  # raises on a bad combination
        if self.cls_reduce < 1 or self.embed_dim % self.cls_reduce:
            raise ValueError(f"cls_reduce must be a positive divisor of embed_dim {self.embed_dim}, "
                             f"got {self.cls_reduce}")

    @property
    def grid_size(self):
        return self.img_size // self.patch_size

    @property
    def num_patches(self):
        return self.grid_size ** 2

    @property
    def d_inner(self):
        return self.expand * self.embed_dim

    @property
    def family(self) -> str:
        """The backbone family these options describe: Vim, VideoMamba or MambaReg."""
        return {"middle": "Vim", "first": "VideoMamba", "registers": "MambaReg"}[self.cls_position]

    def updated(self, **overrides):
        """A copy with `overrides`; unknown names raise instead of being swallowed."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown Vim option(s) {unknown}; known: {sorted(known)}")
        return replace(self, **overrides)


VIM_TINY = VimConfig(embed_dim=192)
VIM_SMALL = VimConfig(embed_dim=384)
VIM_BASE = VimConfig(embed_dim=768)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, num_patches, D) by a strided conv (stride = kernel size); no norm.

    The conv runs as what it is, one matrix product over the non-overlapping patches: cuDNN picks a slow
    implicit-GEMM kernel for this shape (0.83 ms of a 20 ms Vim-S forward at batch 128 in bf16 on an
    H200). The weight stays the Conv2d's, so checkpoints load unchanged."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.proj.in_channels, self.img_size, self.img_size):
            raise ValueError(f"expected images (B, {self.proj.in_channels}, {self.img_size}, {self.img_size}), "
                             f"got {tuple(x.shape)}; set img_size and in_chans to match the input")
        b, c = x.shape[:2]
        p = self.proj.kernel_size[0]
        g = self.img_size // p
        patches = x.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)
        return F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)


class Block(nn.Module):
    """Add -> RMSNorm -> mixer, with the residual stream carried separately in fp32."""

    def __init__(self, dim, mixer: nn.Module, drop_path=0.0, eps=1e-5):
        super().__init__()
        self.mixer = mixer
        self.norm = RMSNorm(dim, eps=eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def add_norm(self, hidden, residual):
        """residual + drop_path(hidden) -> (RMSNorm of it, new fp32 residual). residual None: first layer.
        drop_path is the identity outside training: not called then (a module call on every layer)."""
        if residual is not None and self.training:
            hidden = self.drop_path(hidden)
        norm = self.norm
        return rms_norm_fn(hidden, norm.weight, None, residual=residual, prenorm=True, residual_in_fp32=True,
                           eps=norm.eps)

    def forward(self, hidden, residual=None, **mixer_kwargs):
        normed, residual = self.add_norm(hidden, residual)
        return self.mixer(normed, **mixer_kwargs), residual


def make_mixer(cfg: VimConfig, layer_idx: int, mixer_cls: Type[Mamba] = Mamba):
    return mixer_cls(cfg.embed_dim, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand,
                     layer_idx=layer_idx, bimamba_type="v2", if_divide_out=cfg.divide_out)


class Vim(nn.Module):
    """Dense Vim classifier. forward(x) -> logits; forward_with_tokens(x) -> (logits, patch tokens)."""

    def __init__(self, cfg: VimConfig, mixer_cls: Type[Mamba] = Mamba):
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.embed_dim = self.num_features = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        num_patches, n = cfg.num_patches, cfg.num_cls_tokens
        self.layout = make_layout(cfg.cls_position, n)
        self.cls_token = nn.Parameter(torch.zeros(1, n, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + (0 if cfg.cls_pos_embed else n), cfg.embed_dim))
        self.pos_embed_cls = nn.Parameter(torch.zeros(1, n, cfg.embed_dim)) if cfg.cls_pos_embed else None
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        # Layer i drops with rate*(i-1)/(depth-1) (0 for the first), the final add+norm with the full rate.
        steps = max(cfg.depth - 1, 1)
        rates = [0.0] + [cfg.drop_path_rate * i / steps for i in range(cfg.depth)]
        self.layers = nn.ModuleList(
            Block(cfg.embed_dim, make_mixer(cfg, i, mixer_cls), rates[i], cfg.norm_eps) for i in range(cfg.depth))
        self.drop_path = DropPath(cfg.drop_path_rate) if cfg.drop_path_rate > 0 else nn.Identity()
        self.norm_f = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.neck = self.norm_neck = None
        head_width = n * cfg.embed_dim // cfg.cls_reduce
        if cfg.cls_reduce > 1:
            self.neck = nn.Linear(cfg.embed_dim, cfg.embed_dim // cfg.cls_reduce, bias=False)
            self.norm_neck = RMSNorm(head_width, eps=cfg.norm_eps)
        self.head = nn.Linear(head_width, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._init_weights()

    @property
    def cls_positions(self) -> tuple:
        """Positions of the class token(s) in the dense sequence (Vim: the middle of the patches)."""
        return self.layout.positions(self.cfg.num_patches)

    @property
    def cls_index(self) -> int:
        """Position of the single class token in the dense sequence (Vim, VideoMamba)."""
        positions = self.cls_positions
        if len(positions) != 1:
            raise ValueError(f"this model has {len(positions)} class tokens (registers): use cls_positions")
        return positions[0]

    def pos_embed_class_entries(self, num_patches: int) -> tuple:
        """Which entries of pos_embed belong to class tokens for a grid of num_patches (for resizing)."""
        return () if self.cfg.cls_pos_embed else self.layout.positions(num_patches)

    def _init_weights(self):
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if name == "head":
                    trunc_normal_(m.weight, std=0.02)
                if m.bias is not None and not getattr(m.bias, "_no_reinit", False):
                    nn.init.zeros_(m.bias)
        for layer in self.layers:  # GPT-2 style: scale the residual-branch output projection by depth
            nn.init.kaiming_uniform_(layer.mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                layer.mixer.out_proj.weight /= math.sqrt(self.cfg.depth)
        if self.pos_embed_cls is not None:
            trunc_normal_(self.pos_embed_cls, std=0.02)
        if self.neck is not None:
            trunc_normal_(self.neck.weight, std=0.02)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token", "pos_embed_cls"}

    def embed(self, x):
        """Images -> (B, num_patches + n, D): patches and class token(s) at cls_positions, + position embedding
        (Vim, VideoMamba: over the whole sequence; MambaReg: pos_embed on the patches, pos_embed_cls on the
        registers, before they are interleaved)."""
        patches = self.patch_embed(x)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        if self.pos_embed_cls is not None:
            return insert_cls(self.pos_drop(patches + self.pos_embed), cls + self.pos_embed_cls, self.cls_positions)
        return self.pos_drop(insert_cls(patches, cls, self.cls_positions) + self.pos_embed)

    def classify(self, cls_tokens):
        """Final-normed class tokens (B, n, D) in position order -> logits. MambaReg: each register through the
        neck, flattened, norm_neck; Vim / VideoMamba: the head on the single class token."""
        if self.neck is not None:
            return self.head(self.norm_neck(self.neck(cls_tokens).flatten(1)))
        return self.head(cls_tokens.flatten(1))

    def final_norm(self, hidden, residual):
        return rms_norm_fn(self.drop_path(hidden), self.norm_f.weight, None, residual=residual, prenorm=False,
                           residual_in_fp32=True, eps=self.norm_f.eps)

    def layer_inference_weights(self, x) -> list:
        """Each layer's mixer weights for eager inference (Mamba.inference_weights; None entries where nothing
        is cached, e.g. in training), checked with one key over the whole model per forward."""
        return inference_weights_of(self, lambda: [layer.mixer for layer in self.layers], x)

    def forward_features(self, x):
        """-> final-normed sequence (B, num_patches + n, D), class token(s) at `cls_positions`."""
        hidden, residual = self.embed(x), None
        for layer, weights in zip(self.layers, self.layer_inference_weights(hidden)):
            hidden, residual = layer(hidden, residual, weights=weights)
        return self.final_norm(hidden, residual)

    def forward_with_tokens(self, x):
        """-> (logits, patch tokens (B, num_patches, D) after norm_f in original order, class tokens removed): the
        teacher's view."""
        cls, patches = split_cls(self.forward_features(x), self.cls_positions)
        return self.classify(cls), patches

    def forward(self, x):
        return self.classify(take_cls(self.forward_features(x), self.cls_positions))

    def forward_aux(self, x):
        """-> ForwardOutput, the type a DyVM returns: every token kept, no gates."""
        logits, patches = self.forward_with_tokens(x)
        batch, num_patches = patches.shape[:2]
        return ForwardOutput(
            logits=logits, patch_tokens=patches, final_policy=patches.new_ones(batch, num_patches, 1),
            slot_to_patch=torch.arange(num_patches, device=x.device).expand(batch, num_patches),
            decisions=[], gates=None, seq_lens=[num_patches + self.cfg.num_cls_tokens] * len(self.layers))


def build_config(base: VimConfig, kwargs) -> VimConfig:
    """Apply timm create_model kwargs to a base config; refuse pretrained downloads."""
    if kwargs.pop("pretrained", False):
        raise ValueError("pretrained=True would download weights, which this project never does: build the "
                         "model, then load a released file with dyvm.checkpoint.load_checkpoint(model, path)")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return base.updated(**kwargs)


def create_vim(base: VimConfig, **kwargs) -> Vim:
    return Vim(build_config(base, kwargs))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_config(model: nn.Module) -> Optional[VimConfig]:
    return getattr(model, "cfg", None)
