"""Checkpoints: loading model weights, and main.py's training-checkpoint format.

Model weights: official Vim, VideoMamba and MambaReg files, DyVM files (ours and the authors' layout, which are
the same key names), 'model' / 'model_ema' wrappers, 'module.' prefixes, position-embedding interpolation (each
family keeps its class entries elsewhere in pos_embed). Only the DyVM heads
(score_predictors.*, layers.*.mixer.block_head.*) may be missing (a DyVM made from a dense Vim) or left over
(a dense model or a non-learned ablation loading a DyVM file); any other missing, unexpected or mis-shaped key
is an error that counts them and shows the first three.

Training checkpoints (checkpoint.pth / best_checkpoint.pth of main.py): a dict with
  model, model_ema        state dicts (model_ema None without EMA)
  optimizer, lr_scheduler, scaler   their state dicts (scaler None without fp16)
  epoch, global_step      the last finished epoch and the optimizer steps so far
  max_accuracy            the best validation top-1 so far
  args                    every option of the run (--resume restores them; flags given again win)
  teacher_path            the frozen dense teacher's file, relative to the checkpoint's folder when it lies
                          on the same drive ('' without a teacher), so a moved output tree still finds it
Written atomically (a temporary file, then a rename), so an interrupted save never leaves a broken file.
"""
import argparse
import math
import os
import pickle
import re
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from dyvm.models.mixer import reset_gate_head
from dyvm.pruning import insert_cls, split_cls

_DYVM_KEY = re.compile(r"^(score_predictors\.|layers\.\d+\.mixer\.block_head\.)")
_GATE_KEY = re.compile(r"^layers\.\d+\.mixer\.block_head\.")
_PREDICTOR_KEY = re.compile(r"^score_predictors\.")
# Keys of the authors' files that no model uses (Token_Only's unused per-block layer_head).
_DEAD_KEY = re.compile(r"^layers\.\d+\.layer_head\.")
_WRAPPERS = ("model", "state_dict", "module")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names every offending key."""


@dataclass
class LoadReport:
    source: str  # "dense" (no DyVM heads in the file) or "dyvm"
    missing_dyvm_heads: list = field(default_factory=list)  # left at their fresh initialisation
    ignored_keys: list = field(default_factory=list)  # in the file, not used by this model (DyVM heads / dead)
    gates_initialised: bool = False  # block heads set to weight 0 / bias 5 (DyVM first made from a dense Vim)
    pos_embed_resized: Optional[tuple] = None  # (old grid side, new grid side) when interpolated

    def summary(self) -> str:
        notes = [f"loaded a {self.source} checkpoint"]
        if self.gates_initialised:
            notes.append("gate heads initialised to weight 0 / bias 5 (fresh DyVM from a dense Vim)")
        predictors = sorted({k.split(".")[1] for k in self.missing_dyvm_heads if k.startswith("score_predictors.")})
        if predictors:
            notes.append(f"token predictors {predictors} freshly initialised")
        if self.ignored_keys:
            notes.append(f"{len(self.ignored_keys)} key(s) not used by this model ignored")
        if self.pos_embed_resized:
            notes.append("pos_embed interpolated from a {0}x{0} to a {1}x{1} grid".format(*self.pos_embed_resized))
        return "; ".join(notes)


def is_dyvm_key(key: str) -> bool:
    return bool(_DYVM_KEY.match(key))


def read_checkpoint(path: str, what: str = "checkpoint"):
    """torch.load, with a file that is not a checkpoint (a text file, a truncated download) as a one-line
    CheckpointError. mmap: a training checkpoint is read only as far as it is used."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} {path} does not exist")
    def load(weights_only: bool):
        try:
            return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # files in torch's legacy (pre-zip) format cannot be mapped
                raise
            return torch.load(path, map_location="cpu", weights_only=weights_only)

    try:
        try:  # the released Vim files pickle their argparse Namespace next to the weights
            with torch.serialization.safe_globals([argparse.Namespace]):
                return load(True)
        except pickle.UnpicklingError:  # a local training checkpoint with other Python objects in its args
            return load(False)
    except Exception as e:  # torch.load fails in many ways on a file that is not one (KeyError, EOFError, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise CheckpointError(f"{what} {path} is not a checkpoint that torch.load can read ({first})") from None


def extract_state_dict(obj, use_ema: bool = False, name: str = "checkpoint") -> dict:
    """{'model': sd} / {'model_ema': sd} / {'state_dict': sd} / bare sd -> sd without 'module.' prefixes."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{name} holds a {type(obj).__name__}, not a state dict")
    if use_ema:
        if "model_ema" not in obj:
            raise CheckpointError(f"{name} has no 'model_ema' entry (keys: {sorted(obj)[:8]})")
        obj = obj["model_ema"]
    else:
        for key in _WRAPPERS:
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"{name} does not hold a state dict of tensors (keys: {sorted(obj)[:8]})")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_state_dict_file(path: str, use_ema: bool = False) -> dict:
    """The model weights in a checkpoint file (see extract_state_dict)."""
    return extract_state_dict(read_checkpoint(path), use_ema=use_ema, name=path)


# Backbone families by a fragment of the model names their training runs record ('args.model' of Vim, VideoMamba,
# Mamba-R and DyVM runs, ours included): checked in this order ("videomamba" before "vim" is not needed, but
# "mambar" covers mambar_small_patch16_224 and MambaReg-Small).
_FAMILY_NAMES = (("videomamba", "VideoMamba"), ("mambar", "MambaReg"), ("vim", "Vim"))


def recorded_family(obj) -> Optional[tuple]:
    """(recorded model name, backbone family) from a checkpoint's 'args', or None when it records none we know."""
    args = obj.get("args") if isinstance(obj, dict) else None
    name = args.get("model") if isinstance(args, dict) else getattr(args, "model", None)
    if not isinstance(name, str):
        return None
    for fragment, family in _FAMILY_NAMES:
        if fragment in name.lower():
            return name, family
    return None


def check_family(model: nn.Module, obj, name: str) -> None:
    """Refuse a checkpoint whose run recorded another backbone family than the model's. Vim and VideoMamba weights
    have the same names and shapes, so a Vim file loads silently into a VideoMamba (the class token then sits
    where those weights never saw it): the authors' VideoMamba-S script starts from the Vim-S file that way."""
    cfg, recorded = getattr(model, "cfg", None), recorded_family(obj)
    family = getattr(cfg, "family", None)
    if recorded is not None and family is not None and recorded[1] != family:
        raise CheckpointError(f"{name} was trained as {recorded[0]!r}, a {recorded[1]}, but the model is a {family}: "
                              f"start from a {family} checkpoint")


def _vim_cls_entries(num_patches: int) -> tuple:
    return (num_patches // 2,)


def resize_pos_embed(pos_embed: torch.Tensor, num_patches: int,
                     cls_entries: Callable[[int], tuple] = _vim_cls_entries) -> torch.Tensor:
    """(1, M0+c, D) -> (1, M+c, D), where cls_entries(m) gives the positions of the c class-token entries for m
    patches: Vim's one in the middle (the default), VideoMamba's first, none for MambaReg (its registers have
    their own pos_embed_cls, which no grid size changes).

    The class entries are set aside (they are not grid positions), the patch grid is resized bicubically, and
    the class entries are put back where the new number of patches puts them.
    """
    c = len(cls_entries(num_patches))
    old = pos_embed.shape[1] - c
    g0, g = math.isqrt(old), math.isqrt(num_patches)
    if g0 * g0 != old or g * g != num_patches:
        raise CheckpointError(f"pos_embed for {old} patches cannot be resized to {num_patches}: not square grids")
    cls, patches = split_cls(pos_embed, cls_entries(old)) if c else (None, pos_embed)
    grid = patches.reshape(1, g0, g0, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, g * g, -1).to(pos_embed.dtype)
    return insert_cls(patches, cls, cls_entries(num_patches)) if c else patches


def load_checkpoint(model: nn.Module, path_or_state_dict: Union[str, dict], *, use_ema: bool = False) -> LoadReport:
    """Load a dense (Vim, VideoMamba, MambaReg) or DyVM checkpoint into a dense model or a DyVM of the same
    backbone; raise CheckpointError on any real mismatch."""
    if isinstance(path_or_state_dict, dict):
        obj, name = path_or_state_dict, "state dict"
    else:
        obj, name = read_checkpoint(path_or_state_dict), path_or_state_dict
    state = extract_state_dict(obj, use_ema=use_ema, name=name)
    check_family(model, obj, name)
    own = model.state_dict()
    report = LoadReport(source="dyvm" if any(is_dyvm_key(k) for k in state) else "dense")

    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        old = state["pos_embed"]
        cls_entries = getattr(model, "pos_embed_class_entries", _vim_cls_entries)
        c = len(cls_entries(own["pos_embed"].shape[1]))  # the same number of class entries for every grid
        num_patches = own["pos_embed"].shape[1] - c
        state = dict(state, pos_embed=resize_pos_embed(old, num_patches, cls_entries))
        report.pos_embed_resized = (math.isqrt(old.shape[1] - c), math.isqrt(num_patches))

    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    report.ignored_keys = [k for k in unexpected if is_dyvm_key(k) or _DEAD_KEY.match(k)]
    unexpected = [k for k in unexpected if k not in report.ignored_keys]
    report.missing_dyvm_heads = [k for k in missing if is_dyvm_key(k)]
    missing = [k for k in missing if not is_dyvm_key(k)]
    for group in (_PREDICTOR_KEY, _GATE_KEY):  # a head group the file brings must be complete
        if any(group.match(k) for k in state):
            missing += [k for k in report.missing_dyvm_heads if group.match(k)]
    mismatched = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(mismatch_message(missing, unexpected, mismatched, state, own))

    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    gate_heads = [m.block_head for m in model.modules() if getattr(m, "block_head", None) is not None]
    if gate_heads and not any(_GATE_KEY.match(k) for k in state):
        for head in gate_heads:  # a DyVM first made from a dense Vim: every scan starts on
            reset_gate_head(head)
        report.gates_initialised = True
    return report


def mismatch_message(missing: list, unexpected: list, mismatched: list, state: dict, own: dict) -> str:
    """One short line: how many tensors differ, of which kind, the first three, and a likely cause."""
    counts = [f"{len(v)} {what}" for v, what in ((missing, "missing"), (unexpected, "unexpected"),
                                                 (mismatched, "of another shape")) if v]
    kinds = [[f"missing {k}" for k in missing], [f"unexpected {k}" for k in unexpected],
             [f"shape {m}" for m in mismatched]]
    examples = [e for i in range(3) for kind in kinds for e in kind[i:i + 1]][:3]  # every kind shown first
    n = len(missing) + len(unexpected) + len(mismatched)
    msg = f"checkpoint does not fit the model: {n} tensor(s) differ ({', '.join(counts)}), e.g. {'; '.join(examples)}"
    key = "patch_embed.proj.weight"
    if key in state and key in own and state[key].shape[0] != own[key].shape[0]:
        msg += (f" (the file holds a model of width {state[key].shape[0]}, this one is {own[key].shape[0]}: "
                "check --model and the size options)")
    return msg


def save_checkpoint(obj, path: str) -> None:
    """torch.save atomically: a temp file in the same directory, fsync, then os.replace over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pth", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ----------------------------------------------------------------------------- main.py's training checkpoints
def record_teacher_path(teacher_path: str, checkpoint_dir: str) -> str:
    """The teacher's path as stored in a checkpoint: relative to the checkpoint's folder where possible."""
    if not teacher_path:
        return ""
    try:
        return os.path.relpath(os.path.abspath(teacher_path), os.path.abspath(checkpoint_dir))
    except ValueError:  # another drive (Windows): keep it absolute
        return os.path.abspath(teacher_path)


def recorded_teacher_path(checkpoint: dict, checkpoint_path: str) -> Optional[str]:
    """Where the teacher recorded in a training checkpoint is now, or None when none is recorded. A relative
    record resolves against the checkpoint's folder (older checkpoints recorded it relative to the working
    directory: tried second). The returned path may not exist (the caller decides whether that matters)."""
    recorded = checkpoint.get("teacher_path") if isinstance(checkpoint, dict) else None
    if not recorded:
        return None
    if os.path.isabs(recorded):
        return recorded
    beside = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), recorded))
    return beside if os.path.exists(beside) or not os.path.exists(recorded) else recorded


def training_state(model: nn.Module, optimizer, scheduler, scaler, ema, *, epoch: int, global_step: int,
                   max_accuracy: float, args, teacher_path: str, checkpoint_dir: str) -> dict:
    """Everything --resume needs to continue exactly (the format in this module's docstring)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
            "model_ema": ema.module.state_dict() if ema is not None else None, "epoch": epoch,
            "global_step": global_step, "max_accuracy": max_accuracy,
            "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "teacher_path": record_teacher_path(teacher_path, checkpoint_dir)}


def save_training_checkpoint(state: dict, output_dir: str, is_best: bool) -> None:
    save_checkpoint(state, os.path.join(output_dir, "checkpoint.pth"))
    if is_best:
        save_checkpoint(state, os.path.join(output_dir, "best_checkpoint.pth"))


def load_training_checkpoint(path: str) -> dict:
    """A checkpoint.pth of main.py for --resume; anything else is a one-line CheckpointError."""
    ckpt = read_checkpoint(path, "--resume")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "epoch" not in ckpt:
        raise CheckpointError(f"--resume {path} is not a training checkpoint of main.py (it needs 'model' and "
                              "'epoch'); to start from weights use --model-path")
    return ckpt


def saved_args(path: str) -> dict:
    """The options a training checkpoint was written with ({} for a file without them)."""
    args = load_training_checkpoint(path).get("args") or {}
    return dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)


def restore_training_state(ckpt: dict, optimizer, scheduler, scaler=None, ema=None) -> tuple:
    """Load the optimisation state of a training checkpoint -> (first epoch to run, best top-1, global step)."""
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["lr_scheduler"])
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    if ema is not None and ckpt.get("model_ema") is not None:
        ema.module.load_state_dict(ckpt["model_ema"])
    return ckpt["epoch"] + 1, ckpt.get("max_accuracy", 0.0), ckpt.get("global_step", 0)
