"""The DyVM training loss (docs/reference.md section 3) and the frozen dense teacher (Vim, VideoMamba or
MambaReg: the dense model of the student's backbone).

    loss = w_clf * L_cls + w_tok * L_tok / S + w_blk * L_blk + w_dist * (L_kl + L_td)

L_cls: the base criterion (soft-target CE under mixup). L_tok = sum over the S stages of
mean_b (mean_n keep_s - r_s)^2. L_blk = (mean of every gate - r_blk)^2, one batch-global mean.
L_kl = KL(teacher || student) of the class distributions. L_td = mean squared error between the student's
kept patch tokens and the teacher's tokens at the same original patches (aligned by slot_to_patch).
"""
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from dyvm.models.output import ForwardOutput
from dyvm.models.vim import Vim, VimConfig
from dyvm.pruning import batch_gather
from mamba_ssm.modules.mamba_simple import declare_constant_weights
from mamba_ssm.ops.dispatch import graph_capturing

LOSS_PARTS = ("cls_loss", "token_pruning_loss", "block_pruning_loss", "cls_kl_loss", "token_kl_loss")


def token_ratio_loss(decisions: Sequence[Tensor], keep_ratios: Sequence[float]) -> Tensor:
    """sum_s mean_b (mean_n decisions_s[b, n] - r_s)^2 over (B, M) cumulative keep decisions."""
    if len(decisions) != len(keep_ratios):
        raise ValueError(f"{len(decisions)} pruning stages but {len(keep_ratios)} token keep ratios")
    return sum(((d.float().mean(1) - r) ** 2).mean() for d, r in zip(decisions, keep_ratios))


def block_ratio_loss(gates: Tensor, keep_ratio: float) -> Tensor:
    """(mean over layers, samples and directions of the gates - keep_ratio)^2."""
    return (gates.float().mean() - keep_ratio) ** 2


def distill_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(p_teacher || p_student), averaged over the batch, temperature 1."""
    return F.kl_div(F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1), reduction="batchmean",
                    log_target=True)


def token_distill_mse(student_tokens: Tensor, final_policy: Tensor, slot_to_patch: Tensor,
                      teacher_tokens: Tensor) -> Tensor:
    """Mean of (student - teacher)^2 over the kept slots and channels; 0 when no slot is kept.

    student_tokens (B, S, D) in slot order, final_policy (B, S, 1), slot_to_patch (B, S),
    teacher_tokens (B, M, D) in original patch order.
    """
    teacher = batch_gather(teacher_tokens, slot_to_patch)
    kept = (final_policy[..., 0] > 0.5).unsqueeze(-1).to(student_tokens.dtype)
    count = kept.sum() * student_tokens.shape[-1]
    sq = ((student_tokens.float() - teacher.float()) ** 2 * kept).sum()
    return torch.where(count > 0, sq / count.clamp(min=1), sq * 0)


class DyVMLoss(nn.Module):
    """Wraps the base criterion; runs the frozen teacher under no_grad on the same images.

    forward(images, out, targets) -> (total, parts); parts holds every term, already weighted and detached,
    under LOSS_PARTS names. Terms that do not apply (no decisions, gates or teacher) are 0. teacher_dtype: the
    autocast dtype of the teacher's forward ("auto": the training's own; None: fp32). The teacher is frozen and its
    weights are taken as constant from here on (load them before building the loss: see declare_constant_weights).
    """

    def __init__(self, base_criterion: nn.Module, teacher: Optional[nn.Module], token_keep_ratios: Sequence[float],
                 block_keep_ratio: float, clf_weight: float = 1.0, token_weight: float = 10.0,
                 block_weight: float = 10.0, distill_weight: float = 0.5, token_distill: bool = True,
                 teacher_dtype="auto"):
        super().__init__()
        self.base_criterion = base_criterion
        self.teacher = teacher
        self._teacher_fast = None
        if teacher is not None:
            # Its weights are constant from here on: the CUDA graphs its forward is captured in (its own, below, and
            # a graphed training step's) read the weights its eager calls derived, stacked and cast, instead of
            # deriving them again at every replay (mamba_ssm.modules.mamba_simple.declare_constant_weights).
            declare_constant_weights(freeze(teacher))
            # The frozen teacher needs no autograd: on a GPU it replays a CUDA graph of its forward (captured per
            # batch shape and autocast dtype), which takes its launch work off the training step's host time.
            from dyvm.serving import GraphedModule
            self._teacher_fast = GraphedModule(teacher, method="forward_with_tokens", dtype=teacher_dtype,
                                               max_graphs=2)
        self._side, self._ahead = None, None  # teacher_ahead's stream, and what it started: (images, outputs)
        self.token_keep_ratios = tuple(float(r) for r in token_keep_ratios)
        self.block_keep_ratio = float(block_keep_ratio)
        self.clf_weight, self.token_weight, self.block_weight = clf_weight, token_weight, block_weight
        self.distill_weight, self.token_distill = distill_weight, token_distill

    @classmethod
    def from_model(cls, model: nn.Module, base_criterion: nn.Module, teacher: Optional[nn.Module],
                   **weights) -> "DyVMLoss":
        """The loss with the keep-ratio targets the model itself prunes to (model.dyvm_cfg), so the two cannot
        disagree (the reference's Token_Only targeted other ratios than it pruned to). Random and static
        pruning decide nothing learnable: their ratio term is a constant, so its weight is 0."""
        dyvm_cfg = getattr(model, "dyvm_cfg", None)
        if dyvm_cfg is None:
            return cls(base_criterion, teacher, (), 0.0, **weights)
        if dyvm_cfg.pruning != "learned":
            weights["token_weight"] = 0.0
        return cls(base_criterion, teacher, dyvm_cfg.token_keep_ratios[:dyvm_cfg.num_stages],
                   dyvm_cfg.block_keep_ratio, **weights)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:  # the teacher stays in eval mode whatever the student does
            self.teacher.eval()
        return self

    def teacher_ahead(self, images: Tensor) -> None:
        """Start the teacher's forward on `images` now, on a side stream of their GPU, so that it runs beside the
        student's forward and backward instead of after the student's forward; forward() then takes its outputs
        for these same images. The training steps call this first (inside their autocast, which the teacher
        follows). Same kernels, same results bit for bit; on an H200, DyVM-S's graphed steps 3.0% faster in fp32
        and 1.8% in bf16 (train_teacher_ahead_h200_2026-11-28.txt). Off a GPU, or without a teacher, nothing
        happens."""
        self._ahead = None
        if self.teacher is None or not self.distill_weight or not images.is_cuda:
            return
        if self._side is None or self._side.device != images.device:
            self._side = torch.cuda.Stream(device=images.device)
        # Everything the side stream does starts after the work queued on the step's stream so far (the images,
        # and the last step's reads of the teacher's outputs, which a graph replay overwrites); the step's stream
        # waits for the side stream before the loss reads the outputs (forward).
        self._side.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(self._side):
            self._ahead = (images, self._teacher_fast(images))

    def _teacher_outputs(self, images: Tensor):
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] is images:
            torch.cuda.current_stream(images.device).wait_stream(self._side)
            return ahead[1]
        return self._teacher_fast(images)

    def forward(self, images: Tensor, out: ForwardOutput, targets: Tensor):
        zero = out.logits.new_zeros(())
        cls = self.clf_weight * self.base_criterion(out.logits, targets)
        token = zero
        if out.decisions:
            stages = len(out.decisions)
            token = self.token_weight * token_ratio_loss(out.decisions, self.token_keep_ratios[:stages]) / stages
        block = zero if out.gates is None else self.block_weight * block_ratio_loss(out.gates, self.block_keep_ratio)
        kl, td = zero, zero
        if self.teacher is not None and self.distill_weight:
            teacher_logits, teacher_tokens = self._teacher_outputs(images)
            kl = self.distill_weight * distill_kl(out.logits, teacher_logits.to(out.logits.dtype))
            if self.token_distill:
                td = self.distill_weight * token_distill_mse(out.patch_tokens, out.final_policy, out.slot_to_patch,
                                                             teacher_tokens)
        total = cls + token + block + kl + td
        # (not while a CUDA graph of the step is captured: the check waits on the device; the graphed step
        # checks the loss after each replay instead, dyvm.train_graph)
        if not graph_capturing(total) and not torch.isfinite(total):
            bad = [n for n, v in zip(LOSS_PARTS, (cls, token, block, kl, td)) if not torch.isfinite(v)]
            raise FloatingPointError(f"non-finite loss term(s) {bad}")
        parts = {n: v.detach() for n, v in zip(LOSS_PARTS, (cls, token, block, kl, td))}
        return total, parts


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode, no gradients: a teacher is never trained."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def build_teacher(student: Union[nn.Module, VimConfig], path: Union[str, dict], use_ema: bool = False) -> nn.Module:
    """The frozen dense teacher of a DyVM student, from the original dense checkpoint (a path or a state dict):
    the dense model of the same backbone (Vim, VideoMamba or MambaReg: the student's dense twin,
    dyvm.models.registry.dense_twin), or a dense model of the given config.

    Refuses a DyVM checkpoint: the teacher must be the dense model the student started from, never the
    student's own weights (the reference took them on resume and evaluation).
    """
    from dyvm.checkpoint import (CheckpointError, extract_state_dict, is_dyvm_key, load_checkpoint,
                                 read_checkpoint)

    cfg = student.cfg if isinstance(student, nn.Module) else student
    obj = path if isinstance(path, dict) else read_checkpoint(path)
    state = extract_state_dict(obj, use_ema=use_ema, name=path if isinstance(path, str) else "state dict")
    dyvm_keys = [k for k in state if is_dyvm_key(k)]
    if dyvm_keys:
        raise CheckpointError(f"teacher checkpoint {path if isinstance(path, str) else '<state dict>'} holds a DyVM "
                              f"model ({dyvm_keys[0]}, ...): the teacher must be the original dense "
                              f"{cfg.family} checkpoint")
    if isinstance(student, nn.Module):
        from dyvm.models.registry import dense_twin
        teacher = dense_twin(student)
    else:
        teacher = Vim(student)
    load_checkpoint(teacher, obj, use_ema=use_ema)
    return freeze(teacher)
