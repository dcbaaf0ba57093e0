"""Initialising a segmentation model from a checkpoint: a classification file (dense Vim or DyVM, e.g. the
released vim_t_midclstok_76p1acc.pth) or a segmentation file of this project (e.g. the dense segmenter a DyVM
segmenter is fine-tuned from).

From a classification file only the backbone is taken: the class token, the final norm and the head are
dropped; the position embedding loses its class-token entry, which in Vim sits in the MIDDLE of the sequence
(index M//2 of M patches; the authors' loader dropped index 0, shifting the first half of the patch embeddings
by one), and the patch grid is resized bicubically to the new grid (14x14 -> 32x32 at 512x512); DyVM heads in
the file are not used: the token predictors keep their fresh initialisation and the gate heads start open
(weight 0, bias 5). The neck and the decode heads stay freshly initialised.

A segmentation file loads whole; a dense one into a DyVM segmenter leaves the predictors fresh and opens the
gates. Every other missing, unexpected or mis-shaped key is an error naming them (dyvm.checkpoint).
"""
import math
from typing import Union

import torch
import torch.nn.functional as F

from dyvm.checkpoint import CheckpointError, extract_state_dict, is_dyvm_key, load_checkpoint, load_state_dict_file
from dyvm.seg.segmentor import Segmentor

_CLASSIFIER_ONLY = ("cls_token", "norm_f.", "head.")
_BACKBONE = "backbone."


def drop_class_entry(pos_embed: torch.Tensor) -> torch.Tensor:
    """(1, M+1, D) of a Vim classifier, class entry at M//2 -> (1, M, D): the patch entries in raster order."""
    m = pos_embed.shape[1] - 1
    return torch.cat([pos_embed[:, :m // 2], pos_embed[:, m // 2 + 1:]], dim=1)


def resize_grid(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, g0*g0, D) raster-order patch entries -> (1, grid*grid, D), bicubic on the grid (as timm / the authors)."""
    g0 = math.isqrt(pos_embed.shape[1])
    if g0 * g0 != pos_embed.shape[1]:
        raise CheckpointError(f"pos_embed has {pos_embed.shape[1]} patch entries: not a square grid")
    if g0 == grid:
        return pos_embed
    x = pos_embed.reshape(1, g0, g0, -1).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)


def _pos_embed_for(state: dict, grid: int, from_classifier: bool) -> list:
    notes = []
    pos = state["pos_embed"]
    if from_classifier:
        pos = drop_class_entry(pos)
        notes.append(f"class-token entry of pos_embed removed (index {pos.shape[1] // 2})")
    g0 = math.isqrt(pos.shape[1])
    state["pos_embed"] = resize_grid(pos, grid)
    if g0 != grid:
        notes.append(f"pos_embed resized from a {g0}x{g0} to a {grid}x{grid} grid")
    return notes


def load_seg_checkpoint(model: Segmentor, path_or_state: Union[str, dict], use_ema: bool = False) -> str:
    """Load a classification or segmentation checkpoint into `model`; returns a one-line summary."""
    if isinstance(path_or_state, dict):
        state = extract_state_dict(path_or_state, use_ema=use_ema, name="state dict")
    else:
        state = load_state_dict_file(path_or_state, use_ema=use_ema)
    grid = model.backbone.cfg.grid_size
    if any(k.startswith(_BACKBONE) for k in state):  # a segmentation checkpoint
        backbone = {k[len(_BACKBONE):]: v for k, v in state.items() if k.startswith(_BACKBONE)}
        rest = {k: v for k, v in state.items() if not k.startswith(_BACKBONE)}
        notes = _pos_embed_for(backbone, grid, from_classifier=False) if "pos_embed" in backbone else []
        report = load_checkpoint(model.backbone, backbone)
        own = {k: v for k, v in model.state_dict().items() if not k.startswith(_BACKBONE)}
        missing, unexpected = sorted(set(own) - set(rest)), sorted(set(rest) - set(own))
        mismatched = [f"{k} {tuple(rest[k].shape)} vs model {tuple(own[k].shape)}"
                      for k in own if k in rest and rest[k].shape != own[k].shape]
        if missing or unexpected or mismatched:
            raise CheckpointError(f"segmentation checkpoint does not fit the model's neck/heads: missing {missing}, "
                                  f"unexpected {unexpected}, shape mismatch {mismatched}")
        model.load_state_dict(rest, strict=False)
        return "; ".join([f"loaded a {report.source} segmentation checkpoint", *notes] +
                         (["gate heads initialised open (weight 0, bias 5)"] if report.gates_initialised else []) +
                         (["token predictors freshly initialised"] if any(
                             k.startswith("score_predictors.") for k in report.missing_dyvm_heads) else []))
    if "pos_embed" not in state:
        raise CheckpointError("checkpoint has no pos_embed: neither a Vim/DyVM classifier nor a segmentation model")
    dropped = sorted(k for k in state if k.startswith(_CLASSIFIER_ONLY) or is_dyvm_key(k))
    backbone = {k: v for k, v in state.items() if k not in dropped}
    notes = _pos_embed_for(backbone, grid, from_classifier="cls_token" in state)
    load_checkpoint(model.backbone, backbone)  # names any missing / unexpected / mis-shaped key
    heads = "; DyVM heads in the file not used (predictors fresh, gates open)" if any(map(is_dyvm_key, dropped)) \
        else ""
    return (f"loaded the backbone of a classification checkpoint ({len(dropped)} classifier-only key(s) dropped"
            f"{heads}); " + "; ".join(notes) + "; neck and heads freshly initialised")
