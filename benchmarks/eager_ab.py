"""A/B of one switch in eager inference, inside one process: the host's pace moves by up to 2x between processes
(and within one) on the shared GPU hosts, so two processes cannot resolve a few percent; alternating the two
settings round by round in one process can. The switch is a function that returns a bool (a path choice), forced
to False for "off" (unittest.mock), e.g. mamba_ssm.ops.bimamba_stacked._gate_in_projections.

Per setting: launches and GPU kernel time per forward (torch.profiler, 3 forwards), then ROUNDS rounds in
alternating order, each 5 forwards timed on the host (until model(x) returns) and 10 timed to the GPU's end.

    PYTHONPATH=mamba-1p1p1:. python3 benchmarks/eager_ab.py mamba_ssm.ops.bimamba_stacked._gate_in_projections \
        [--model dyvm_vim_small] [--dtype bf16] [--batch-size 128] [--rounds 12] [--device cuda] [--img-size 224]

On a CPU (--device cpu, for the tests) there are no launches to count; the rounds run the same way.
"""
import argparse
import importlib
import statistics
import time
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile

from dyvm.benchmark import AUTHORS_REALISED_BLOCK_KEEP_RATIO, build_model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def launches_and_gpu_ms(model, x, forwards: int = 3):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(forwards):
            model(x)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(kernels) / forwards, sum(e.device_time for e in kernels) / forwards / 1e3


def one_round(model, x):
    """Host ms per forward (5) and images/s (10 forwards, to the GPU's end)."""
    model(x)
    sync(x.device)
    host = []
    for _ in range(5):
        sync(x.device)
        t0 = time.perf_counter()
        model(x)
        host.append(time.perf_counter() - t0)
    sync(x.device)
    t0 = time.perf_counter()
    for _ in range(10):
        model(x)
    sync(x.device)
    return host, 10 * x.shape[0] / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("switch", help="module.function returning a bool; 'off' forces it to False")
    p.add_argument("--model", default="dyvm_vim_small")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--device", default="cuda")
    p.add_argument("--img-size", type=int, default=224)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("eager_ab: no CUDA device is visible (--device cpu runs it on the CPU)")
    module_name, _, attr = args.switch.rpartition(".")
    module = importlib.import_module(module_name)
    if not callable(getattr(module, attr, None)):
        raise SystemExit(f"eager_ab: {args.switch} is not a function of {module_name}")
    torch.manual_seed(0)
    _, model, _ = build_model(args.model, device, args.img_size, block_keep_ratio=AUTHORS_REALISED_BLOCK_KEEP_RATIO)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    settings = {"on": getattr(module, attr), "off": lambda *a, **k: False}
    host = {s: [] for s in settings}
    rate = {s: [] for s in settings}
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{card} | torch {torch.__version__} | {args.model} {args.dtype} "
          f"batch {args.batch_size} | {args.switch}", flush=True)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
        for s, fn in settings.items():
            with mock.patch.object(module, attr, fn):
                for _ in range(5):
                    model(x)
                if device.type == "cuda":
                    n, ms = launches_and_gpu_ms(model, x)
                    print(f"{s}: launches per forward {n:.0f}, GPU kernel time per forward {ms:.2f} ms", flush=True)
        for rnd in range(args.rounds):
            order = list(settings) if rnd % 2 == 0 else list(reversed(settings))
            for s in order:
                with mock.patch.object(module, attr, settings[s]):
                    h, r = one_round(model, x)
                host[s] += h
                rate[s].append(r)
    for s in settings:
        r = sorted(rate[s])
        print(f"{s}: host per forward median {1e3 * statistics.median(host[s]):.2f} ms; images/s median "
              f"{statistics.median(r):.0f} (min {r[0]:.0f}, max {r[-1]:.0f}, {args.rounds} rounds)")
    wins = sum(a > b for a, b in zip(rate["on"], rate["off"]))
    print(f"rounds where on > off: {wins} of {args.rounds}; per round on/off images/s: "
          + ", ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(rate["on"], rate["off"])))


if __name__ == "__main__":
    main()
