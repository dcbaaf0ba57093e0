"""What a training step costs: images/s, peak memory and where the GPU time goes, for dense Vim and for DyVM
fine-tuning (student + frozen dense teacher + the full DyVM loss), through the same code main.py trains with
(dyvm.engine.train_one_epoch: mixup, autocast, the loss, backward, AdamW from timm, the EMA update).

    python benchmarks/train_step.py --models vim_small dyvm_vim_small --dtypes fp32 bf16 --batch-size 128
    torchrun --nproc_per_node=2 benchmarks/train_step.py --models vim_small dyvm_vim_small   # images/s per GPU

Random weights and a fixed random batch on the device (no data loading in the timing); DyVM starts from the dense
model's weights (gates open), token keep 0.7, block keep target 0.8, loss weights 10 / 10 / 0.5 (configs/vim-s.yaml).
Its predictors keep 0.7 of the remaining tokens per stage (--token-keep target: the share the fine-tune's ratio loss
holds them at; fresh ones keep about half, --token-keep init); each DyVM row reports the tokens a step kept.
Each row: `--warmup` steps, then `--steps` timed steps bracketed by device synchronisation. Under torchrun every
process runs its own batch (per-GPU batch = --batch-size), and DDP is set up as main.py does unless --ddp-static.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn


class DeviceBatches:
    """A loader of one random batch on the device, `steps` times (mixup makes every step's targets differ). The
    batch is made once, before any timing: drawing 19M normal samples on the host and a pageable copy cost
    about 100 ms, 5% of a 20-step measurement."""

    def __init__(self, batch: int, img_size: int, num_classes: int, device):
        g = torch.Generator(device="cpu").manual_seed(0)
        self.images = torch.randn(batch, 3, img_size, img_size, generator=g).to(device)
        self.targets = torch.randint(0, num_classes, (batch,), generator=g).to(device)
        self.steps = 0

    def repeat(self, steps: int) -> "DeviceBatches":
        self.steps = steps
        return self

    def __len__(self):
        return self.steps

    def __iter__(self):
        return iter([(self.images, self.targets)] * self.steps)


def keep_target_share(model, ratio: float) -> None:
    """Set each score predictor to keep `ratio` of the tokens it scores, in expectation: its last Linear's bias
    makes the log-probabilities about [log r, log(1 - r)] (the weights of a fresh predictor add little), and the
    Gumbel draw keeps a token with probability r. Where a fine-tune sits: the ratio loss holds the kept shares at
    the targets r, r^2, r^3."""
    import math

    for predictor in model.score_predictors or []:
        with torch.no_grad():
            predictor.out_conv[4].bias.copy_(torch.tensor([math.log(ratio), math.log(1.0 - ratio)]))


def kept_tokens(model, images) -> list:
    """The mean number of patch tokens a training forward keeps after each stage."""
    with torch.no_grad():
        out = model.forward_aux(images)
    return [round(float(d.sum(1).float().mean()), 1) for d in out.decisions]


def build(name: str, device, img_size: int, teacher_dtype: str = "auto", token_keep: str = "target"):
    """(model, criterion) for a dense timm name or a DyVM one (then with its frozen dense teacher). Built with
    dyvm.benchmark.build_model (positional arguments: the script also times earlier revisions as baselines).
    token_keep: "target" (keep_target_share at 0.7) or "init" (the fresh predictors)."""
    from timm.loss import SoftTargetCrossEntropy

    from dyvm.benchmark import build_model
    from dyvm.checkpoint import load_checkpoint
    from dyvm.engine import ClassificationLoss
    from dyvm.losses import DyVMLoss, build_teacher

    torch.manual_seed(0)
    if not name.startswith("dyvm_"):
        model = build_model(name, device, img_size)[1].train()
        return model, ClassificationLoss(SoftTargetCrossEntropy())
    dense = build_model(name[len("dyvm_"):], "cpu", img_size)[1]
    model = build_model(name, "cpu", img_size, 0.7)[1].train()
    load_checkpoint(model, dense.state_dict())
    if token_keep == "target":
        keep_target_share(model, 0.7)
    teacher = build_teacher(model.cfg, dense.state_dict()).to(device)
    dtype = {"auto": {}, "bfloat16": {"teacher_dtype": torch.bfloat16}}[teacher_dtype]  # ({}: older revisions)
    criterion = DyVMLoss.from_model(model, SoftTargetCrossEntropy(), teacher, token_weight=10.0, block_weight=10.0,
                                    distill_weight=0.5, **dtype)
    return model.to(device), criterion


def kernel_census(events: list, top: int) -> str:
    """One step's kernels from a Chrome trace's events (torch.profiler's export): how many, their summed time, the
    union of the intervals they ran (branches of a graph overlap), the time from the first one's start to the last
    one's end (the gaps between kernels are the difference), and per stream the `top` kernels by time. A DyVM step's
    frozen teacher runs on a branch of its graph, which the driver spreads over streams with some of the student's
    forward: a stream is not a model."""
    kernels = sorted((e for e in events if e.get("cat") == "kernel" and e.get("ph") == "X"), key=lambda e: e["ts"])
    if not kernels:
        return "no kernels in the trace"
    busy, start, end = 0.0, kernels[0]["ts"], kernels[0]["ts"]
    for e in kernels:
        if e["ts"] > end:
            busy, start = busy + end - start, e["ts"]
        end = max(end, e["ts"] + e["dur"])
    busy += end - start
    t0 = kernels[0]["ts"]
    lines = [f"kernels {len(kernels)}, {sum(e['dur'] for e in kernels) / 1e3:.2f} ms of kernel time, busy "
             f"{busy / 1e3:.2f} ms, first start to last end {(end - t0) / 1e3:.2f} ms"]
    streams = {}
    for e in kernels:
        streams.setdefault(e.get("args", {}).get("stream"), []).append(e)
    for stream, group in sorted(streams.items(), key=lambda kv: -sum(e["dur"] for e in kv[1])):
        lines.append(f"stream {stream}: {len(group)} kernels, {sum(e['dur'] for e in group) / 1e3:.2f} ms, from "
                     f"{(group[0]['ts'] - t0) / 1e3:.2f} to {(max(e['ts'] + e['dur'] for e in group) - t0) / 1e3:.2f} ms")
        by_name = {}
        for e in group:
            count_time = by_name.setdefault(_short(e["name"]), [0, 0.0])
            count_time[0] += 1
            count_time[1] += e["dur"]
        for name, (count, dur) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]:
            lines.append(f"  {dur / 1e3:8.3f} ms {count:5d}x  {name}")
        lines += _stream_gaps(group, top)
    other = [e for e in events if e.get("cat") in ("gpu_memset", "gpu_memcpy") and e.get("ph") == "X"]
    if other:
        lines.append(f"memsets and copies (not kernels: in the gaps above): {len(other)}, "
                     f"{sum(e['dur'] for e in other) / 1e3:.3f} ms")
    return "\n".join(lines)


def _stream_gaps(group: list, top: int) -> list:
    """The idle time of one stream between its kernels (each kernel's start minus the previous one's end there),
    summed by the kernel that waited, with the median gap: whether the time between kernels is a constant cost of
    every launch (then fewer kernels pay) or a few long waits (then those are the lead); and the longest gaps with
    their neighbours."""
    gaps, end, previous, t0 = [], group[0]["ts"] + group[0]["dur"], _short(group[0]["name"]), group[0]["ts"]
    for e in group[1:]:
        if e["ts"] > end:
            gaps.append((e["ts"] - end, previous, _short(e["name"]), end - t0))
        end, previous = max(end, e["ts"] + e["dur"]), _short(e["name"])
    if not gaps:
        return []
    sizes = sorted(g[0] for g in gaps)
    lines = [f"  gaps: {len(gaps)}, {sum(sizes) / 1e3:.3f} ms, median {sizes[len(sizes) // 2]:.1f} us, "
             f"90th percentile {sizes[int(0.9 * (len(sizes) - 1))]:.1f} us, longest {sizes[-1]:.1f} us"]
    by_next = {}
    for gap, _, nxt, _ in gaps:
        by_next.setdefault(nxt, []).append(gap)
    for name, values in sorted(by_next.items(), key=lambda kv: -sum(kv[1]))[:min(top, 12)]:
        values.sort()
        lines.append(f"  {sum(values) / 1e3:8.3f} ms {len(values):5d}x before {name} "
                     f"(median {values[len(values) // 2]:.1f} us)")
    for gap, prev, nxt, at in sorted(gaps, reverse=True)[:5]:
        lines.append(f"  {gap:8.1f} us at {at / 1e3:.2f} ms: {prev} -> {nxt}")
    return lines


def _short(kernel: str) -> str:
    """A kernel's name without the namespaces that make torch's all begin alike."""
    for prefix in ("void ", "at::native::", "(anonymous namespace)::"):
        kernel = kernel.replace(prefix, "")
    return kernel[:60]


def profile_steps(run, top: int, shapes: bool = False, census: bool = False) -> str:
    """The `top` ops by GPU time over two steps; shapes: grouped by input shapes too (eager steps only: a graph
    replay records no aten ops), to tell which call of an op the time goes to; census: one step's kernels by stream
    instead (kernel_census)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    if census:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run(1)
            torch.cuda.synchronize()
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "trace.json")
            prof.export_chrome_trace(path)
            with open(path) as f:
                return kernel_census(json.load(f)["traceEvents"], top)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=shapes) as prof:
        run(2)
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events) / 2
    table = events.table(sort_by="self_cuda_time_total", row_limit=top, max_name_column_width=60)
    if shapes:
        table += "\n" + prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cuda_time_total", row_limit=top, max_name_column_width=40, max_shapes_column_width=90)
    return f"GPU busy per step: {gpu_us / 1e3:.1f} ms\n{table}"


def measure(name: str, dtype: str, args, device, world: int, rank: int) -> dict:
    from timm.data import Mixup
    from timm.optim import create_optimizer_v2
    try:
        from dyvm.ema import ModelEma
    except ImportError:  # (a revision from before dyvm.ema, timed as a baseline)
        from timm.utils import ModelEmaV3 as ModelEma

    from dyvm.engine import AuxForward, train_one_epoch

    model, criterion = build(name, device, args.img_size, args.teacher_dtype, args.token_keep)
    amp = {"fp32": None, "bf16": torch.bfloat16}[dtype]
    graphed = args.cuda_graph
    extra = dict(fused=True, capturable=True) if graphed else {}
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-4, weight_decay=0.05, **extra)
    ema = ModelEma(model, decay=0.99996)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=1000)
    train_model, stream = AuxForward(model), None
    ddp = dict(static_graph=True) if args.ddp_static else dict(find_unused_parameters=args.ddp_find_unused)
    if world > 1 and graphed:  # built on the stream that will capture its all-reduces (dyvm/train_graph.py)
        from dyvm.train_graph import distributed_for_graphs
        train_model, stream = distributed_for_graphs(train_model, device, **ddp)
    elif world > 1:
        train_model = nn.parallel.DistributedDataParallel(train_model, device_ids=[device.index], **ddp)

    step = {}
    if graphed:  # (imported here: the script also times revisions from before dyvm.train_graph as baselines)
        from dyvm.train_graph import GraphedTrainStep
        step = {"graph_step": GraphedTrainStep(train_model, criterion, optimizer, amp,
                                               **({"stream": stream} if stream is not None else {}))}

    batches = DeviceBatches(args.batch_size, args.img_size, 1000, device)
    kept = kept_tokens(model, batches.images) if name.startswith("dyvm_") else None

    def run(steps):
        return train_one_epoch(train_model, criterion, batches.repeat(steps), optimizer, device, 0, mixup_fn=mixup,
                               ema=ema, amp_dtype=amp, progress=False, **step)

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)  # before the warm-up: a graphed step allocates when it captures
    # a graphed DDP step runs 11 eager steps before it captures (dyvm.train_graph.DDP_WARMUP): all in the warm-up
    run(max(args.warmup, 13) if graphed and world > 1 else args.warmup)
    torch.cuda.synchronize()
    start = time.perf_counter()
    stats = run(args.steps)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    row = {"model": name, "dtype": dtype, "batch_size_per_gpu": args.batch_size, "world_size": world,
           "images_per_s_per_gpu": args.batch_size * args.steps / elapsed, "step_ms": 1e3 * elapsed / args.steps,
           "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30, "loss": stats["loss"],
           "ddp": (("static_graph" if args.ddp_static else f"find_unused_parameters={args.ddp_find_unused}")
                   if world > 1 else None),
           "cuda_graph": graphed, "kept_tokens": kept}
    streams = getattr(args, "profile_streams", False)
    if (args.profile or streams) and rank == 0:  # (--profile-streams alone: the 30 largest kernels a stream)
        row["profile"] = profile_steps(run, args.profile or 30, getattr(args, "profile_shapes", False), streams)
    return row


def parser() -> argparse.ArgumentParser:
    """The script's options (benchmarks/gpu_check.py takes its defaults from here too)."""
    from dyvm.config import add_tf32_flag

    p = argparse.ArgumentParser("benchmarks/train_step.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["vim_tiny", "vim_small", "vim_base", "dyvm_vim_small"])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    p.add_argument("--batch-size", type=int, default=128, help="per GPU")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--profile", type=int, default=0, metavar="N", help="print the N ops with the most GPU time")
    p.add_argument("--profile-shapes", action="store_true", help="with --profile, also by input shapes (eager)")
    p.add_argument("--profile-streams", action="store_true", help="one step's kernels instead of --profile's table: "
                   "count, busy time, the gaps, and the N (--profile, else 30) largest per stream (graphed steps too)")
    p.add_argument("--ddp-find-unused", action=argparse.BooleanOptionalAction, default=True,
                   help="DDP's find_unused_parameters (main.py's setting)")
    p.add_argument("--ddp-static", action="store_true", help="DDP with static_graph=True instead of main.py's "
                   "find_unused_parameters=True")
    p.add_argument("--cuda-graph", action="store_true", help="replay each step from a CUDA graph "
                   "(dyvm.train_graph; fused AdamW; under torchrun DDP's all-reduces are captured too)")
    add_tf32_flag(p)
    p.add_argument("--teacher-dtype", default="auto", choices=("auto", "bfloat16"),
                   help="DyVM rows: the teacher's precision (main.py --teacher-dtype)")
    p.add_argument("--token-keep", default="target", choices=("target", "init"),
                   help="DyVM rows: predictors that keep 0.7 of the remaining tokens per stage (target), or fresh "
                        "ones (init, about half)")
    p.add_argument("--json", default="")
    return p


def main(argv=None) -> int:
    from dyvm.config import apply_tf32

    args = parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("error: this benchmark times GPU training steps; no CUDA device is visible", file=sys.stderr)
        return 2
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    apply_tf32(args, device, lambda *m: print(*m) if rank == 0 else None)
    if world > 1:
        dist.init_process_group("nccl")
    from dyvm.benchmark import environment

    env = environment()
    if rank == 0:
        print(" | ".join(f"{k}: {v}" for k, v in env.items()), f"| world size {world}", flush=True)
    rows = []
    for name in args.models:
        for dtype in args.dtypes:
            try:
                row = measure(name, dtype, args, device, world, rank)
            except torch.cuda.OutOfMemoryError:
                row = {"model": name, "dtype": dtype, "error": "out of GPU memory"}
                torch.cuda.empty_cache()
            rows.append(row)
            torch.cuda.empty_cache()  # the row's models are gone: give their memory back before the next
            if rank == 0:
                if "error" in row:
                    print(f"{name:16s} {dtype:5s} {row['error']}", flush=True)
                    continue
                mode = ("graph" if row["cuda_graph"] else "eager") + (" tf32" if args.tf32 else "")
                print(f"{name:16s} {dtype:5s} {mode} batch {args.batch_size} x {world}: "
                      f"{row['images_per_s_per_gpu']:8.1f} images/s per GPU, {row['step_ms']:7.1f} ms/step, "
                      f"peak {row['peak_memory_gib']:5.1f} GiB"
                      + (f", kept tokens {row['kept_tokens']}" if row["kept_tokens"] else ""), flush=True)
                if "profile" in row:
                    print(row["profile"], flush=True)
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "args": vars(args), "rows": rows}, f, indent=1)
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
