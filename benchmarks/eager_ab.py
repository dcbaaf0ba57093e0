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
import json
import math
import statistics
import sys
import time
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile

from causal_conv1d import launch_replay
from dyvm.benchmark import AUTHORS_REALISED_BLOCK_KEEP_RATIO, build_model, environment


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


def sign_test(wins: int, rounds: int) -> float:
    """One-sided p-value of at least `wins` wins in `rounds` rounds if both settings were equally fast."""
    return sum(math.comb(rounds, k) for k in range(wins, rounds + 1)) / 2 ** rounds


def measure(model, x, module, attr: str, rounds: int, autocast) -> dict:
    """Launches and GPU time per setting (CUDA), then `rounds` rounds in alternating order: host seconds per
    forward and images/s per round and setting."""
    settings = {"on": getattr(module, attr), "off": lambda *a, **k: False}
    out = {s: {"host_s": [], "images_per_s": []} for s in settings}
    with torch.no_grad(), autocast:
        for s, fn in settings.items():
            with mock.patch.object(module, attr, fn):
                for _ in range(5):
                    model(x)
                if x.device.type == "cuda":
                    out[s]["launches"], out[s]["gpu_ms"] = launches_and_gpu_ms(model, x)
        for rnd in range(rounds):
            for s in (list(settings) if rnd % 2 == 0 else list(reversed(settings))):
                with mock.patch.object(module, attr, settings[s]):
                    host, rate = one_round(model, x)
                out[s]["host_s"] += host
                out[s]["images_per_s"].append(rate)
    return out


def report(out: dict) -> dict:
    """Prints the measurement; returns its summary (wins, the sign test's p-value)."""
    for s in ("on", "off"):
        if "launches" in out[s]:
            print(f"{s}: launches per forward {out[s]['launches']:.0f}, GPU kernel time per forward "
                  f"{out[s]['gpu_ms']:.2f} ms")
    for s in ("on", "off"):
        r = sorted(out[s]["images_per_s"])
        print(f"{s}: host per forward median {1e3 * statistics.median(out[s]['host_s']):.2f} ms; images/s median "
              f"{statistics.median(r):.0f} (min {r[0]:.0f}, max {r[-1]:.0f}, {len(r)} rounds)")
    on, off = out["on"]["images_per_s"], out["off"]["images_per_s"]
    wins = sum(a > b for a, b in zip(on, off))
    p = sign_test(wins, len(on))
    print(f"rounds where on > off: {wins} of {len(on)} (one-sided sign test p = {p:.2g}); per round on/off "
          "images/s: " + ", ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(on, off)))
    return {"wins": wins, "rounds": len(on), "sign_test_p": p}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("switch", help="module.function returning a bool; 'off' forces it to False")
    p.add_argument("--model", default="dyvm_vim_small")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--device", default="cuda")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--json", default="", help="also write the environment and every measurement here")
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
    env = environment()
    print(f"{env.get('device')} | torch {torch.__version__} | {args.model} {args.dtype} batch {args.batch_size} | "
          f"{args.switch}", flush=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    if module is not launch_replay:  # (a replayed call would not see the switch: replays off in both settings)
        print("launch replays (causal_conv1d.launch_replay) off in both settings", flush=True)
        with mock.patch.object(launch_replay, "replays_enabled", lambda: False):
            out = measure(model, x, module, attr, args.rounds, autocast)
    else:
        out = measure(model, x, module, attr, args.rounds, autocast)
    summary = report(out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "command": " ".join(sys.argv), "args": vars(args), "summary": summary,
                       "settings": out}, f, indent=1)


if __name__ == "__main__":
    main()
