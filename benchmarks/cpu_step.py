"""CPU training-step time of the demo's models (configs/demo-dense.yaml, configs/demo-dyvm.yaml), split into
forward (model), loss (the DyVM teacher's forward included), backward and update (optimizer + EMA), and the
eval forward of one batch; each on the PyTorch implementations (the default CPU path) and on the plain
references (MAMBA_FORCE_REFERENCE=1), interleaved in the same process, so that a busy machine slows both
alike. Random images; the DyVM's teacher is a random dense twin (the same cost as the real one).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/cpu_step.py [--rounds 5] [--steps 4] [--paths impl ref]
        [--configs dense dyvm] [--threads 1] [--profile dyvm] [--out benchmarks/results/cpu_step_<date>.txt]

Prints the median over rounds of the mean over `steps` steps, in ms, with the machine, its load and the
command, and the process's CPU time per training step; --out also writes that text to a file. On a machine
shared with other jobs, wall times swing with the load (a thread that loses its core stalls every op that
waits for it): with --threads 1 the CPU time per step is the steadier measure for comparing code.
--profile CONFIG prints torch.profiler's op table of a few training steps of CONFIG on the implementations.
"""
import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning threads on a shared CPU
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

PATHS = {"impl": "0", "ref": "1"}  # MAMBA_FORCE_REFERENCE per path
PHASES = ("forward", "loss", "backward", "update", "step", "eval", "step_cpu")


def build(config: str):
    """Model, criterion, optimizer and EMA as main.py builds them for the demo config `config`."""
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    import dyvm  # noqa: F401  (registers the model names)
    from dyvm.config import parse_args
    from dyvm.ema import ModelEma
    from dyvm.engine import AuxForward, build_model
    from dyvm.losses import freeze
    from dyvm.models.vim import Vim
    from main import build_criterion

    args = parse_args(["--config", os.path.join("configs", f"demo-{config}.yaml")])
    torch.manual_seed(0)
    model = build_model(args, 10)
    teacher = freeze(Vim(model.cfg)) if getattr(model, "dyvm_cfg", None) is not None else None
    criterion = build_criterion(args, model, teacher, False)
    opt_kw = optimizer_kwargs(cfg=args)
    optimizer = create_optimizer_v2(model, **opt_kw)
    ema = ModelEma(model, decay=args.model_ema_decay)
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size)
    targets = torch.randint(0, 10, (args.batch_size,))
    return AuxForward(model), model, criterion, optimizer, ema, images, targets


def time_steps(setup, steps: int) -> dict:
    """Mean ms per phase over `steps` training steps, then one eval forward."""
    train_model, model, criterion, optimizer, ema, images, targets = setup
    model.train()
    criterion.train()
    totals = dict.fromkeys(PHASES, 0.0)
    cpu0 = time.process_time()
    for _ in range(steps):
        t0 = time.perf_counter()
        out = train_model(images)
        t1 = time.perf_counter()
        loss, _ = criterion(images, out, targets)
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        optimizer.step()
        ema.update(model)
        t4 = time.perf_counter()
        for phase, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
            totals[phase] += dt
    totals["step_cpu"] = time.process_time() - cpu0
    model.eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        model.forward_aux(images)
        totals["eval"] = (time.perf_counter() - t0) * steps
    return {k: 1e3 * v / steps for k, v in totals.items()}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load average {load}")


def run(args) -> str:
    previous = os.environ.get("MAMBA_FORCE_REFERENCE")
    try:
        return _run(args)
    finally:  # the paths are switched through the environment: leave it as it was
        os.environ.pop("MAMBA_FORCE_REFERENCE", None)
        if previous is not None:
            os.environ["MAMBA_FORCE_REFERENCE"] = previous


def _run(args) -> str:
    setups = {c: build(c) for c in args.configs}
    results = {(c, p): [] for c in args.configs for p in args.paths}
    for c in args.configs:  # warm-up: first calls allocate and fill caches
        for p in args.paths:
            os.environ["MAMBA_FORCE_REFERENCE"] = PATHS[p]
            time_steps(setups[c], 1)
    for _ in range(args.rounds):
        for c in args.configs:
            for p in args.paths:
                os.environ["MAMBA_FORCE_REFERENCE"] = PATHS[p]
                results[(c, p)].append(time_steps(setups[c], args.steps))
    lines = [f"# benchmarks/cpu_step.py, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"# command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}",
             f"# machine: {machine()}",
             f"# median over {args.rounds} rounds of the mean of {args.steps} steps, ms; batch 64, 28x28, patch 4, "
             "depth 6, width 64, d_state 8",
             f"{'config':8s} {'path':5s} " + " ".join(f"{p:>9s}" for p in PHASES)]
    for (c, p), runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in PHASES}
        lines.append(f"{c:8s} {p:5s} " + " ".join(f"{med[k]:9.1f}" for k in PHASES))
    for c in args.configs:
        if {"impl", "ref"} <= set(args.paths):
            med = {(p, k): statistics.median(r[k] for r in results[(c, p)]) for p in ("impl", "ref")
                   for k in ("step", "step_cpu")}
            lines.append(f"# {c}: training step {med['ref', 'step'] / med['impl', 'step']:.2f}x faster on the "
                         f"implementations (wall time), {med['ref', 'step_cpu'] / med['impl', 'step_cpu']:.2f}x "
                         "(CPU time)")
    return "\n".join(lines)


def profile(config: str, steps: int = 3) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    setup = build(config)
    time_steps(setup, 1)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        time_steps(setup, steps)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["dense", "dyvm"], choices=["dense", "dyvm"])
    p.add_argument("--paths", nargs="+", default=["impl", "ref"], choices=list(PATHS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--profile", choices=["dense", "dyvm"], help="print the op profile of this config instead")
    p.add_argument("--out", help="also write the results to this file")
    args = p.parse_args(argv)
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if args.threads:
        torch.set_num_threads(args.threads)
    text = profile(args.profile) if args.profile else run(args)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
