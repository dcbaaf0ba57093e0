"""Where the host time of eager inference goes, by sampling: py-spy (native stacks included) attached to a process
that runs eager forwards of one model, one at a time (a GPU sync after each, so every sample is the host issuing
a forward, not waiting for one). Complements benchmarks/host_breakdown.py, whose timers wrap our own functions and
so cannot see into the libraries below them: here every sample says which library the host was in (the Python
interpreter running our code, PyTorch's dispatcher, cuBLAS, the CUDA driver, Triton's C launcher, libc's
allocator and locks) and under which of our functions.

Per model, shares of the samples taken inside a forward:
  by library        the library of the innermost frame ("python": the interpreter running Python code);
  by Python frame   the innermost Python function, with whatever native code it called (F.linear's share is
                    the dispatcher and cuBLAS below it);
  inclusive         every Python function on the stack (a function and its callees).

    pip install py-spy      (on a GPU machine without network: carry the wheel)
    PYTHONPATH=$PWD:$PWD/mamba-1p1p1 python benchmarks/host_sampling.py [--models vim_small dyvm_vim_small]
        [--dtype bf16|fp32] [--batch-size 128] [--seconds 12] [--rate 1000] [--top 20] [--out DIR]

Sampling stops the process for each sample, so forwards run several times slower while it records: shares are
what this measures, not times (benchmarks/host_breakdown.py and eager_ab.py give those). py-spy needs permission
to read the worker's memory (root, or ptrace allowed); a missing py-spy is one line, not a traceback.
"""
import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

MARKER = "_eager_forward"  # the worker's function around model(x): samples under it are host time of a forward
_PY_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*\.py|<frozen [^<>]*>):\d+\)$")
_NATIVE_FRAME = re.compile(r"^(?P<func>.*) \((?P<lib>[^()]+)\)$")
# What the libraries are, where the name does not say (by the file name's first part)
LIBRARY_NAMES = {"__triton_launcher": "Triton's C launcher", "python3": "the interpreter's own C code",
                 "libcuda": "libcuda.so (the CUDA driver)", "libc": "libc.so (malloc, locks)",
                 "libtorch_python": "libtorch_python.so (PyTorch's bindings)",
                 "libtorch_cpu": "libtorch_cpu.so (the dispatcher, CPU-side op code)"}


def _eager_forward(model, x):
    return model(x)


def worker(args) -> None:
    """Build the model, warm it up, say READY, then run eager forwards for the recording's length."""
    import torch

    from dyvm.benchmark import AUTHORS_REALISED_BLOCK_KEEP_RATIO, build_model

    device = torch.device(args.device)
    _, model, _ = build_model(args.worker, device, img_size=args.img_size,
                              block_keep_ratio=AUTHORS_REALISED_BLOCK_KEEP_RATIO)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    with torch.no_grad(), autocast:
        for _ in range(10):
            _eager_forward(model, x)
        sync()
        print("READY", flush=True)
        count, host, end = 0, 0.0, time.time() + args.seconds + 3
        while time.time() < end:
            t0 = time.perf_counter()
            _eager_forward(model, x)
            host += time.perf_counter() - t0
            count += 1
            sync()
    print(f"{args.worker}: {count} forwards while sampled, host {1e3 * host / max(count, 1):.2f} ms each", flush=True)


def _frame_key(frame: str):
    """('py', 'func (file.py)') for a Python frame, ('native', library) for a native one, or None."""
    m = _PY_FRAME.match(frame)
    if m:
        return "py", f"{m['func']} ({m['file']})"
    m = _NATIVE_FRAME.match(frame)
    if m:
        lib = re.sub(r"\.so[.\d]*$", ".so", os.path.basename(m["lib"]))  # (libcuda.so.580.159.04 -> libcuda.so)
        return "native", LIBRARY_NAMES.get(lib.split(".")[0], lib)
    return None


def _is_marker(frame: str, marker: str) -> bool:
    """Whether `frame` is a Python frame of the function `marker` (a bare or a qualified name: Class.method)."""
    m = _PY_FRAME.match(frame)
    return m is not None and (m["func"] == marker or m["func"].endswith("." + marker))


def summarise(lines, marker: str = MARKER) -> dict:
    """py-spy's raw output ("frame;frame;... count" per line, outermost first) -> {"samples": n, "library":
    Counter, "python_frame": Counter, "inclusive": Counter} over the stacks that pass through `marker`."""
    library, last_python, inclusive = collections.Counter(), collections.Counter(), collections.Counter()
    total = 0
    for line in lines:
        line = line.strip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        start = next((i for i, f in enumerate(frames) if _is_marker(f, marker)), None)
        if start is None:
            continue
        n = int(count)
        total += n
        keys = [_frame_key(f) for f in frames[start + 1:]]
        python = [k[1] for k in keys if k is not None and k[0] == "py"]
        leaf = keys[-1] if keys else None
        library["python" if leaf is None or leaf[0] == "py" else leaf[1]] += n
        last_python[python[-1] if python else "(the forward call itself)"] += n
        for name in set(python):
            inclusive[name] += n
    return {"samples": total, "library": library, "python_frame": last_python, "inclusive": inclusive}


def report(name: str, summary: dict, top: int, host_line: str = "") -> str:
    total = summary["samples"]
    lines = [f"== {name}: {total} samples inside forwards" + (f" ({host_line})" if host_line else "")]
    if not total:
        return "\n".join(lines + ["   (no samples inside a forward: was py-spy allowed to read the process?)"])
    for title, key in (("by library (innermost frame)", "library"), ("by Python frame (with what it called)",
                                                                       "python_frame"), ("inclusive", "inclusive")):
        lines.append(f"   -- {title}")
        lines += [f"   {100 * v / total:6.1f}%  {k}" for k, v in summary[key].most_common(top)]
    return "\n".join(lines)


def record(model: str, args, out_dir: Path) -> tuple:
    """Run the worker for `model`, sample it with py-spy; -> (raw file, the worker's host-time line)."""
    log = out_dir / f"{model}.log"
    raw = out_dir / f"{model}.raw"
    command = [sys.executable, __file__, "--worker", model, "--dtype", args.dtype, "--batch-size",
               str(args.batch_size), "--img-size", str(args.img_size), "--seconds", str(args.seconds),
               "--device", args.device]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        while "READY" not in log.read_text():
            if proc.poll() is not None:
                raise SystemExit(f"host_sampling: the worker for {model} stopped before it was ready; see {log}")
            time.sleep(0.2)
        spy = subprocess.run(["py-spy", "record", "--native", "--format", "raw", "-r", str(args.rate), "-d",
                              str(args.seconds), "-p", str(proc.pid), "-o", str(raw)], capture_output=True, text=True)
        proc.wait()
    if spy.returncode != 0 or not raw.exists():
        raise SystemExit(f"host_sampling: py-spy failed for {model}: {(spy.stderr or spy.stdout).strip()[-300:]}")
    host = [line for line in log.read_text().splitlines() if "forwards while sampled" in line]
    return raw, host[-1] if host else ""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["vim_small", "dyvm_vim_small"])
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--seconds", type=int, default=12, help="how long py-spy records each model")
    p.add_argument("--rate", type=int, default=1000, help="samples per second")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="host_sampling", help="where the raw stacks and the workers' logs go")
    p.add_argument("--summarise", nargs="*", metavar="RAW", help="only summarise these raw files (no recording)")
    p.add_argument("--marker", default=MARKER, help="--summarise: the function whose samples count (default: the "
                                                    "worker's own; e.g. DyVM.forward for another script's stacks)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.summarise is not None:
        for path in args.summarise:
            print(report(Path(path).stem, summarise(Path(path).read_text().splitlines(), args.marker), args.top))
        return
    if shutil.which("py-spy") is None:
        raise SystemExit("host_sampling: py-spy is not on PATH (pip install py-spy)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"{args.dtype} | batch {args.batch_size} | img {args.img_size} | {args.seconds} s at {args.rate} Hz "
          "per model")
    for model in args.models:
        raw, host = record(model, args, out_dir)
        print(report(model, summarise(raw.read_text().splitlines()), args.top, host), flush=True)


if __name__ == "__main__":
    main()
