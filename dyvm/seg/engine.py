"""One training step and the evaluation pass of a segmentation model (single process or DDP).

evaluate() runs slide inference on every validation image (windows of the crop size), resizes the logits back
to the image's original size, and accumulates the confusion matrix (summed over ranks); it also records what
the backbone ran in each window: tokens kept per stage, scan directions per layer, and MACs per window in both
conventions (dyvm.seg.flops).
"""
from collections import defaultdict
from contextlib import nullcontext
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from tqdm import tqdm

from dyvm.engine import NonFiniteLossError, backward_and_step, unwrap, world
from dyvm.seg.flops import backbone_macs, decode_macs
from dyvm.seg.heads import resize
from dyvm.seg.metrics import confusion_matrix, segmentation_metrics
from dyvm.seg.segmentor import slide_inference


def autocast_for(device: torch.device, amp_dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()


def train_step(model: nn.Module, loss_fn: nn.Module, images: Tensor, masks: Tensor, optimizer, *,
               clip_grad: float = 0.0, amp_dtype: Optional[torch.dtype] = None, scaler=None, it: int = 0) -> dict:
    """Forward, loss, backward, clip, step. Returns the logged numbers (loss terms, gate/token statistics)."""
    model.train()
    with autocast_for(images.device, amp_dtype):
        out = model(images)
    try:  # SegLoss refuses a non-finite total, naming the terms
        loss, parts = loss_fn(out, masks)
        problem = None
    except FloatingPointError as e:
        loss, parts, problem = None, {}, str(e)
    all_ok = problem is None
    if world()[0] > 1:  # every rank must stop together, or the others hang in the gradient all-reduce
        flag = torch.tensor([float(all_ok)], device=images.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        all_ok = bool(flag.item() > 0)
    if not all_ok:
        raise NonFiniteLossError(f"non-finite loss at iteration {it}: {problem or 'in another process'}")
    grad_norm = backward_and_step(model, optimizer, loss, scaler, clip_grad)
    stats = {"loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}}
    if grad_norm is not None:
        stats["grad_norm"] = float(grad_norm)
    b = out.backbone
    if b.gates is not None:
        stats["block_keep_ratio"] = float((b.gates.detach() > 0.5).float().mean())
    for s, d in enumerate(b.decisions):
        stats[f"token_keep_stage{s}"] = float(d.detach().float().mean())
    return stats


def _same_size_groups(images: list, masks: list):
    """Consecutive images of one size stacked into a batch (evaluation images may differ in size)."""
    start = 0
    while start < len(images):
        end = start + 1
        while end < len(images) and images[end].shape == images[start].shape:
            end += 1
        yield torch.stack(images[start:end]), masks[start:end]
        start = end


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, *, crop_size: int, stride: int,
             amp_dtype: Optional[torch.dtype] = None, progress: bool = False, desc: str = "eval") -> dict:
    """mIoU / mAcc / aAcc (single scale, slide inference) and what the backbone ran, summed over ranks."""
    model = unwrap(model)
    model.eval()
    backbone = model.backbone
    world_size, rank = world()
    k = model.num_classes
    confusion = torch.zeros(k, k, dtype=torch.int64, device=device)
    sums = defaultdict(float)
    depth, stages = len(backbone.layers), backbone.dyvm_cfg.num_stages
    gate_on = torch.zeros(depth, 2, dtype=torch.float64, device=device)
    kept = torch.zeros(max(stages, 1), dtype=torch.float64, device=device)

    def on_window(out):
        b = out.backbone
        n = b.features[0].shape[0]
        paper, full = backbone_macs(backbone, b)
        sums["windows"] += n
        sums["macs_paper"] += float(paper.sum())
        sums["macs_full"] += float(full.sum())
        sums["seq_len"] += float(sum(b.seq_lens)) * n
        if b.gates is not None:
            gate_on.add_((b.gates > 0.5).double().sum(1))
        for s, d in enumerate(b.decisions):
            kept[s] += float(d.sum())

    bar = tqdm(loader, desc=desc, disable=not progress or rank != 0, leave=False, dynamic_ncols=True)
    for images, masks in bar:
        for batch, batch_masks in _same_size_groups(images, masks):
            batch = batch.to(device, non_blocking=True)
            with autocast_for(device, amp_dtype):
                logits = slide_inference(model, batch, crop_size, stride, on_window)
            for logit, mask in zip(logits, batch_masks):
                mask = mask.to(device)
                pred = resize(logit[None], mask.shape).argmax(1)[0]
                confusion += confusion_matrix(pred, mask, k)
                sums["images"] += 1
    vec = torch.tensor([sums[n] for n in ("images", "windows", "macs_paper", "macs_full", "seq_len")],
                       dtype=torch.float64, device=device)
    if world_size > 1:
        for t in (confusion, vec, gate_on, kept):
            dist.all_reduce(t)
    images, windows = int(vec[0]), max(1.0, float(vec[1]))
    res = {k_: v for k_, v in segmentation_metrics(confusion.cpu()).items()}
    head = decode_macs(model)
    res.update(num_images=images, num_windows=int(vec[1]), windows_per_image=round(float(vec[1]) / max(1, images), 3),
               gmacs_backbone_paper=float(vec[2]) / windows / 1e9, gmacs_backbone_full=float(vec[3]) / windows / 1e9,
               gmacs_decode=head / 1e9, mean_seq_len=float(vec[4]) / windows / depth)
    res["gmacs_paper"] = res["gmacs_backbone_paper"] + res["gmacs_decode"]
    res["gmacs_full"] = res["gmacs_backbone_full"] + res["gmacs_decode"]
    if backbone.dyvm_cfg.block_selection:
        per_layer = (gate_on / windows).tolist()
        res["block_keep_ratio"] = float(gate_on.sum()) / (windows * 2 * depth)
        res["block_keep_per_layer"] = [[round(f, 4), round(b, 4)] for f, b in per_layer]
    if stages:
        res["tokens_kept_per_stage"] = [round(float(v) / windows, 2) for v in kept]
        res["token_keep_ratio_per_stage"] = [round(float(v) / windows / backbone.cfg.num_patches, 4) for v in kept]
    return res
