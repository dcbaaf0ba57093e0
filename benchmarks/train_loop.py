"""Where a graphed training step's wall time goes outside its kernels: the training loop (dyvm.engine's
train_one_epoch, as benchmarks/train_step.py times it) against the graph's replays alone, then with the step's
non-finite check, mixup and the EMA update added one at a time; the kernels per step and the GPU busy time from
the profiler; the EMA update and a state_dict() walk alone.

    python benchmarks/train_loop.py --models vim_small dyvm_vim_small --dtype bf16

A CUDA device is needed. Models are built as benchmarks/train_step.py builds them (DyVM with its teacher, the full
loss and predictors at the 0.7 target share); batch 128 by default.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _timed(fn, steps: int) -> float:
    """ms per step of fn(steps), after two steps of warm-up."""
    fn(2)
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn(steps)
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / steps


def probe(name: str, amp, batch: int, steps: int, rounds: int) -> None:
    from timm.data import Mixup
    from timm.optim import create_optimizer_v2
    from torch.profiler import ProfilerActivity, profile

    import train_step
    from dyvm.ema import ModelEma
    from dyvm.engine import AuxForward, train_one_epoch
    from dyvm.train_graph import GraphedTrainStep

    device = torch.device("cuda", torch.cuda.current_device())
    model, criterion = train_step.build(name, device, 224)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-4, weight_decay=0.05, fused=True, capturable=True)
    ema = ModelEma(model, decay=0.99996)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=1000)
    train_model = AuxForward(model)
    graph_step = GraphedTrainStep(train_model, criterion, optimizer, amp)
    batches = train_step.DeviceBatches(batch, 224, 1000, device)
    images, targets = batches.images, batches.targets
    mixed = mixup(images.clone(), targets.clone())

    def loop(n):
        train_one_epoch(train_model, criterion, batches.repeat(n), optimizer, device, 0, mixup_fn=mixup, ema=ema,
                        amp_dtype=amp, progress=False, graph_step=graph_step)

    def replays(n, with_check=False, with_mixup=False, with_ema=False):
        for i in range(n):
            result = graph_step(*(mixup(images, targets) if with_mixup else mixed))
            if with_check:
                bool(result.finite)
            if with_ema:
                ema.update(model, step=i)

    variants = {"training loop (train_one_epoch)": loop, "replays only": replays,
                "replays + finite check": lambda n: replays(n, True),
                "replays + check + mixup": lambda n: replays(n, True, True),
                "replays + check + mixup + ema": lambda n: replays(n, True, True, True)}
    loop(4)  # warm-up steps, then the capture
    for _ in range(rounds):
        for label, fn in variants.items():
            print(f"{name:16s} {label:32s} {_timed(fn, steps):7.2f} ms/step", flush=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        replays(4)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    kernels, busy = sum(e.count for e in events) / 4, sum(e.self_device_time_total for e in events) / 4e3
    print(f"{name:16s} profiler: {kernels:.0f} kernels per step, GPU busy {busy:.1f} ms per step", flush=True)
    print(f"{name:16s} ema.update alone: {_timed(lambda n: [ema.update(model, step=5) for _ in range(n)], 20):.2f} ms")
    start = time.perf_counter()
    for _ in range(20):
        model.state_dict()
    print(f"{name:16s} model.state_dict(): {1e3 * (time.perf_counter() - start) / 20:.2f} ms", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser("benchmarks/train_loop.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["vim_small", "dyvm_vim_small"])
    p.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: this benchmark times graphed GPU training steps; no CUDA device is visible", file=sys.stderr)
        return 2
    amp = {"fp32": None, "bf16": torch.bfloat16}[args.dtype]
    for name in args.models:
        probe(name, amp, args.batch_size, args.steps, args.rounds)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
