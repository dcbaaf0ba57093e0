"""train_one_epoch / evaluate (DeiT style), for a dense Vim and for DyVM alike.

Both models return a ForwardOutput from `forward_aux`; the criterion takes (images, output, targets) and
returns (loss, weighted parts). A dense Vim trains with `ClassificationLoss` (the demo's teacher stage), a
DyVM with dyvm.losses.DyVMLoss. Under DDP the model is wrapped in `AuxForward` so that DDP's forward hook
sees the ForwardOutput call.
"""
import os
import random
import time
from collections import defaultdict
from contextlib import nullcontext
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from tqdm import tqdm

from dyvm.flops import macs_from_output
from dyvm.models.registry import ModelOptionError, create_model

__all__ = ["AuxForward", "ClassificationLoss", "ModelOptionError", "NonFiniteLossError", "build_model", "evaluate",
           "backward_and_step", "global_batch_lr", "init_distributed", "model_options", "seed_everything", "train_one_epoch", "unwrap"]


class NonFiniteLossError(RuntimeError):
    """Training stopped on a non-finite loss; the message names where the first non-finite value appeared."""


class AuxForward(nn.Module):
    """model.forward_aux as forward(), so DistributedDataParallel synchronises the gradients of that call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_aux(x)


class ClassificationLoss(nn.Module):
    """The plain loss of a dense model: base criterion on the logits; same call and return as DyVMLoss."""

    def __init__(self, base_criterion: nn.Module):
        super().__init__()
        self.base_criterion = base_criterion

    def forward(self, images, out, targets):
        loss = self.base_criterion(out.logits, targets)
        return loss, {"cls_loss": loss.detach()}


MODEL_OVERRIDES = ("patch_size", "depth", "embed_dim", "d_state")  # small-model flags of main.py


def model_options(args, num_classes: int) -> dict:
    """main.py's flags as options of the model factory (dyvm.models.registry.create_model)."""
    options = dict(img_size=args.input_size, in_chans=args.in_chans, num_classes=num_classes, drop_rate=args.drop,
                   drop_path_rate=args.drop_path, pruning=args.pruning, block_selection=args.block_selection,
                   predictor_input=args.predictor_input, gumbel_noise=args.gumbel_noise,
                   block_keep_ratio=args.block_keep_ratio,
                   pruning_loc=tuple(args.pruning_loc) if args.pruning_loc else None)
    options.update({k: getattr(args, k) for k in MODEL_OVERRIDES})
    if args.token_keep_ratios is not None:
        options["token_keep_ratios"] = tuple(args.token_keep_ratios)
    else:
        options["token_keep_ratio"] = args.token_keep_ratio
    return options


def build_model(args, num_classes: int) -> nn.Module:
    """The model main.py's flags describe (the registry's factory; ModelOptionError on bad options)."""
    return create_model(args.model, **model_options(args, num_classes))


def unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.parallel.DistributedDataParallel, AuxForward)):
        model = model.module if hasattr(model, "module") else model.model
    return model


def world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def init_distributed(args) -> tuple:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: NCCL on GPU, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", args.local_rank))
    want = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(want)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world_size, rank, device


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def all_reduce_sum(t: Tensor) -> Tensor:
    if world()[0] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _nonfinite(obj) -> bool:
    if isinstance(obj, Tensor):
        return obj.is_floating_point() and not bool(torch.isfinite(obj).all())
    if isinstance(obj, (list, tuple)):
        return any(_nonfinite(o) for o in obj)
    if isinstance(obj, dict):
        return any(_nonfinite(o) for o in obj.values())
    if hasattr(obj, "__dataclass_fields__"):
        return any(_nonfinite(getattr(obj, f)) for f in obj.__dataclass_fields__)
    return False


@torch.no_grad()
def locate_nonfinite(model: nn.Module, images: Tensor, parts: dict, loss_note: str = "") -> str:
    """Where did the non-finite loss come from? Checked in order: the input batch, the parameters, the
    first module (in call order) whose output is non-finite when the batch is re-run with forward hooks
    (installed only now, so normal steps pay nothing), and the loss terms."""
    if _nonfinite(images):
        return "the input batch contains non-finite pixels"
    bad = [n for n, p in model.named_parameters() if _nonfinite(p)]
    if bad:
        return f"non-finite parameter(s): {', '.join(bad[:5])}" + (" ..." if len(bad) > 5 else "")
    order = []

    def hook(name):
        def fn(module, inputs, output):
            if not order and _nonfinite(output):
                order.append(name)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        out = model.forward_aux(images)
    finally:
        for h in handles:
            h.remove()
    if order:
        return f"first non-finite output: module '{order[0]}'"
    if _nonfinite(out):
        return "non-finite model output (inside a layer; no hooked sub-module's output was non-finite)"
    terms = [k for k, v in parts.items() if _nonfinite(v)]
    if terms:
        loss_note = f"loss term(s) {terms}"
    return f"{loss_note or 'the loss'} (the model's outputs are finite)"


def _logged(loss: Tensor, parts: dict, out) -> dict:
    """What a training step logs: the loss, its weighted parts, the share of scan directions that ran and each
    stage's share of kept tokens; 0-d tensors, left on the device (a read per value would wait for the GPU)."""
    logged = {"loss": loss.detach(), **{k: v.detach() for k, v in parts.items()}}
    if out.gates is not None:
        logged["block_keep_ratio"] = (out.gates.detach() > 0.5).float().mean()
    for s, d in enumerate(out.decisions):
        logged[f"token_keep_stage{s}"] = d.detach().float().mean()
    return logged


def start_teacher(criterion, images: Tensor) -> None:
    """A training step's first call: the DyVM loss starts its frozen teacher's forward beside the student's
    (dyvm.losses.DyVMLoss.teacher_ahead); other criteria have no teacher."""
    ahead = getattr(criterion, "teacher_ahead", None)
    if ahead is not None:
        ahead(images)


def _eager_step(model, criterion, optimizer, images, targets, amp_dtype, scaler, clip_grad, world_size, epoch,
                step):
    """One eager training step -> (loss, parts, out); raises NonFiniteLossError (on every rank together)."""
    autocast = (torch.autocast(images.device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext())
    try:
        with autocast:
            start_teacher(criterion, images)
            out = model(images)
            loss, parts = criterion(images, out, targets)
        local_ok = bool(torch.isfinite(loss.detach()))
    except FloatingPointError as e:  # DyVMLoss refuses a non-finite total itself, naming the terms
        loss, parts, out, local_ok, loss_note = None, {}, None, False, str(e)
    else:
        loss_note = ""
    if world_size > 1:  # every rank must stop together, or the others hang in the gradient all-reduce
        flag = torch.tensor([float(local_ok)], device=images.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        all_ok = bool(flag.item() > 0)
    else:
        all_ok = local_ok
    if not all_ok:
        where = locate_nonfinite(unwrap(model), images, parts, loss_note) if not local_ok else "in another process"
        raise NonFiniteLossError(f"non-finite loss at epoch {epoch} step {step}: {where}")
    backward_and_step(model, optimizer, loss, scaler, clip_grad)
    return loss, parts, out


def backward_and_step(model: nn.Module, optimizer, loss: Tensor, scaler=None,
                      clip_grad: Optional[float] = None) -> Optional[Tensor]:
    """Zero the gradients, backward (scaled by the fp16 GradScaler if any), clip to clip_grad (None or 0: no
    clipping), optimizer step. Returns the gradient norm before clipping when clipping, else None."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad) if clip_grad else None
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return grad_norm


PROGRESS_EVERY = 10  # training steps between progress-bar loss readouts


class LaggedRead:
    """A step's device scalars read one step late. Each step's values are copied into pinned host memory behind
    that step's work (no wait) and read once the next step has been launched: reading them at once (bool(finite),
    loss.item()) makes the host wait for the GPU to drain, and the GPU then waits while the host runs the EMA
    update, the logging and the next batch's mixup, about 2 ms of a 71 ms graphed Vim-S bf16 step on an H200
    (benchmarks/results/train_host_lag_h200_2026-11-29.txt). On other devices the values are copied as they are."""

    def __init__(self):
        self._pending = None  # (host values, event or None, payload) of the last step pushed

    def push(self, values: Tensor, payload=None) -> Optional[tuple]:
        """Queue this step's values (a 1-d tensor) with a payload; return the previous step's (values as floats,
        payload), waiting only for that step's work, or None at the first step."""
        if values.is_cuda:
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = values.detach().clone(), None
        previous, self._pending = self.take(), (host, event, payload)
        return previous

    def take(self) -> Optional[tuple]:
        """The queued step's (values as floats, payload) once they are on the host, or None; clears the queue."""
        if self._pending is None:
            return None
        host, event, payload = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        return host.tolist(), payload


def _check_graphed_step(read: Optional[tuple], model: nn.Module, epoch: int) -> Optional[float]:
    """A graphed step's (finite, loss) read back by LaggedRead: raise NonFiniteLossError naming that step and where
    its non-finite value came from (its batch re-run on the weights it saw: the graph's update skipped it and every
    step after it), or "in another process" under DDP; else return its loss."""
    if read is None:
        return None
    (finite, loss), (step, images, parts) = read
    if not finite:  # (a finite loss here: the flag came from another process, all-reduced in the graph)
        where = locate_nonfinite(unwrap(model), images, parts) if not np.isfinite(loss) else "in another process"
        raise NonFiniteLossError(f"non-finite loss at epoch {epoch} step {step}: {where}")
    return loss


def train_one_epoch(model: nn.Module, criterion: nn.Module, loader, optimizer, device: torch.device, epoch: int,
                    *, mixup_fn: Optional[Callable] = None, clip_grad: Optional[float] = None, ema=None,
                    amp_dtype: Optional[torch.dtype] = None, scaler=None, max_steps: Optional[int] = None,
                    progress: bool = False, global_step: int = 0, scheduler=None, graph_step=None) -> dict:
    """One epoch; returns the mean of every logged quantity over the processed images (all ranks).
    scheduler: a timm scheduler stepped after every update (--sched-on-updates), None = stepped per epoch.
    graph_step: a dyvm.train_graph.GraphedTrainStep over (model, criterion, optimizer) that runs each step as a
    CUDA-graph replay (mixup and the EMA stay here); None = eager steps."""
    model.train()
    criterion.train()
    world_size, rank = world()
    names, sums = None, None  # the logged quantities' names, and their image-weighted sums (float64, device)
    n_seen = 0
    steps = len(loader) if max_steps is None else min(max_steps, len(loader))
    bar = tqdm(total=steps, desc=f"epoch {epoch} train", disable=not progress or rank != 0, leave=False,
               dynamic_ncols=True)
    start = time.perf_counter()
    lagged, shown_loss = LaggedRead(), None  # graphed steps: their (finite, loss) read one step late
    for step, (images, targets) in enumerate(loader):
        if step >= steps:
            break
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        if graph_step is not None:
            loss, parts, out, finite = graph_step(images, targets)  # (overwritten by the next replay)
        else:
            loss, parts, out = _eager_step(model, criterion, optimizer, images, targets, amp_dtype, scaler,
                                           clip_grad, world_size, epoch, step)
        b = images.shape[0]
        n_seen += b
        logged = _logged(loss, parts, out)
        values = torch.stack([v.reshape(()).to(torch.float64) for v in logged.values()]) * b
        if names is None:
            names, sums = list(logged), values.clone()
        else:
            sums += values
        if graph_step is not None:
            # the step before this one is checked now that this one is queued (a non-finite step and every step
            # after it skip their update on the device): the host never waits for the GPU to drain
            part_values = {name: values[i] for i, name in enumerate(logged) if name in parts}
            read = lagged.push(torch.cat([finite.reshape(1).to(values.dtype), values[:1] / b]),
                               (step, images, part_values))
            shown_loss = _check_graphed_step(read, model, epoch) if read is not None else shown_loss
        if ema is not None:
            ema.update(unwrap(model), step=global_step + step)
        if scheduler is not None:
            scheduler.step_update(global_step + step + 1)
        bar.update(1)
        if not bar.disable and (step % PROGRESS_EVERY == 0 or step + 1 == steps):
            if graph_step is None:  # (reading the loss waits for the GPU; a graphed step shows the one before)
                shown_loss = loss.item()
            if shown_loss is not None:
                bar.set_postfix(loss=f"{shown_loss:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    _check_graphed_step(lagged.take(), model, epoch)
    bar.close()
    names = names or []
    totals = torch.tensor([float(n_seen)], dtype=torch.float64, device=device)
    if sums is not None:
        totals = torch.cat([totals, sums.to(device)])
    totals = all_reduce_sum(totals)
    stats = {k: float(v / max(1.0, totals[0])) for k, v in zip(names, totals[1:])}
    stats["lr"] = optimizer.param_groups[0]["lr"]
    stats["steps"] = steps
    # every process's images over the loop's wall time (data loading, the first steps' compilation and a graph
    # capture included: what an epoch costs); the sums above were read back, so the GPU work is done
    stats["images_per_s"] = float(totals[0]) / max(time.perf_counter() - start, 1e-9)
    return stats


def _topk_correct(logits: Tensor, targets: Tensor, ks=(1, 5)) -> list:
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(targets.unsqueeze(1))
    return [hit[:, :min(k, maxk)].any(dim=1).float().sum() for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, *, amp_dtype: Optional[torch.dtype] = None,
             valid_samples: Optional[int] = None, progress: bool = False, desc: str = "eval",
             distributed: bool = True, cuda_graph: bool = False) -> dict:
    """Top-1/top-5, loss, and what the model ran on this data: tokens kept per stage, block keep ratio
    (overall and per layer), MACs per image in both conventions. `valid_samples`: how many of this rank's
    samples are real (distributed evaluation pads the last rank), None = all. Results are summed over ranks
    when `distributed` (each rank saw its share); otherwise every rank reports its own full pass.
    cuda_graph: on a GPU, run the forwards as CUDA-graph replays (dyvm.serving; the same results, without the
    host's launch work that bounds eager small models and bf16)."""
    from dyvm.serving import graphed

    model = unwrap(model)
    model.eval()
    forward = graphed(model, dtype=amp_dtype, method="forward_aux") if cuda_graph else None
    world_size, rank = world()
    ce = nn.CrossEntropyLoss(reduction="sum")
    sums = defaultdict(lambda: torch.zeros((), dtype=torch.float64, device=device))
    gate_sum, stage_tokens = None, None
    seen = 0
    bar = tqdm(loader, desc=desc, disable=not progress or rank != 0, leave=False, dynamic_ncols=True)
    for images, targets in bar:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        keep = images.shape[0] if valid_samples is None else max(0, min(images.shape[0], valid_samples - seen))
        seen += images.shape[0]
        if keep == 0:
            continue
        images, targets = images[:keep], targets[:keep]
        if forward is not None:  # (a plain forward where the tensors are not on a GPU)
            out = forward(images)
        else:
            with (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()):
                out = model.forward_aux(images)
        logits = out.logits.float()
        top1, top5 = _topk_correct(logits, targets)
        sums["n"] += keep
        sums["loss"] += ce(logits, targets).double()
        sums["top1"] += top1.double()
        sums["top5"] += top5.double()
        paper, full = macs_from_output(model, out)
        sums["macs_paper"] += paper.sum()
        sums["macs_full"] += full.sum()
        if out.gates is not None:
            g = (out.gates > 0.5).double().sum(1)  # (depth, 2): images with each direction on
            gate_sum = g if gate_sum is None else gate_sum + g
        if out.decisions:
            t = torch.stack([d.double().sum() for d in out.decisions])
            stage_tokens = t if stage_tokens is None else stage_tokens + t
        sums["seq_len_sum"] += float(sum(out.seq_lens)) * keep
    reduce = all_reduce_sum if distributed else (lambda t: t)  # noqa: E731
    keys = ["n", "loss", "top1", "top5", "macs_paper", "macs_full", "seq_len_sum"]
    vec = torch.stack([sums[k] for k in keys])
    vec = reduce(vec)
    n = max(1.0, float(vec[0]))
    res = {"num_images": int(vec[0]), "loss": float(vec[1]) / n, "acc1": 100 * float(vec[2]) / n,
           "acc5": 100 * float(vec[3]) / n, "gmacs_paper": float(vec[4]) / n / 1e9,
           "gmacs_full": float(vec[5]) / n / 1e9, "mean_seq_len": float(vec[6]) / n / max(1, len(model.layers))}
    depth = len(model.layers)
    if getattr(model, "dyvm_cfg", None) is not None and model.dyvm_cfg.block_selection:
        gate_sum = reduce(gate_sum if gate_sum is not None else torch.zeros(depth, 2, device=device,
                                                                                   dtype=torch.float64))
        per_layer = (gate_sum / n).tolist()
        res["block_keep_ratio"] = float(gate_sum.sum()) / (n * 2 * depth)
        res["block_keep_per_layer"] = [[round(f, 4), round(b, 4)] for f, b in per_layer]
    stages = model.dyvm_cfg.num_stages if getattr(model, "dyvm_cfg", None) is not None else 0
    if stages:
        st = reduce(stage_tokens if stage_tokens is not None else
                            torch.zeros(stages, device=device, dtype=torch.float64))
        res["tokens_kept_per_stage"] = [round(float(v) / n, 2) for v in st]
        res["token_keep_ratio_per_stage"] = [round(float(v) / n / model.cfg.num_patches, 4) for v in st]
    return res


def global_batch_lr(lr: float, batch_size: int, world_size: int, unscale: bool) -> float:
    """DeiT rule: lr is given for a global batch of 512."""
    return lr if unscale else lr * batch_size * world_size / 512.0
