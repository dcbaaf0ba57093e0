"""The host's share of eager inference, measured on a CPU: what a forward of a dense Vim and of a DyVM asks the
host to do, per layer and per forward, counted where counting does not change the path taken.

Eager inference on a GPU is bound by the host at Vim-S sizes (benchmarks/host_time.py on an H200: the host
spends longer issuing a DyVM forward than the GPU spends running it), so what matters is how many ops and
kernel launches a forward issues and how much Python runs around them. Those numbers depend on the code, not
on the GPU, so they are measured here on a CPU, on two paths:

  cpu         the CPU path as it is: the mamba_ssm / causal_conv1d ops run their PyTorch implementations
              (mamba_ssm/ops/cpu, causal_conv1d/cpu_causal_conv1d.py), whose own ops are counted too;
  cuda-proxy  the CUDA path's code run on CPU tensors: the ops take their Triton branch (triton_on_cpu), and
              every Triton kernel launch is counted and skipped (its outputs stay uninitialised; nothing on
              the host reads them). What is left is exactly the host work of a CUDA forward outside
              Triton's launcher: the model code, the op layers' allocations and views, the torch ops (GEMMs,
              gate, pruning), each a CPU op on a tiny tensor instead of a CUDA launch.

Per forward and per layer (a plain layer: the difference between the model at its depth and 4 layers deeper,
divided by 4; "fixed" is the rest: embedding, pruning stages, head):
  launches     torch ops that would launch a GPU kernel (leaf aten ops other than views and allocations) plus
               Triton launches (cuda-proxy);  triton: the Triton launches alone;
  dispatched   aten ops called from Python (views and allocations included): the dispatcher's work;
  calls        Python function calls (cProfile, built-ins included);
  host_us      median host time of a forward (no profiler), with the models' runs interleaved.

Shapes: the models' own structure (depth, d_state, pruning locations, keep ratios), batch 1, and by default a
tiny image and width (img 32, patch 8: 16 patches; embed_dim 64) so that the ops' own compute is a few
microseconds and the time is the host's overhead. --embed-dim 0 keeps the model's width (vim_small: 384),
whose matmuls then read ~4 MB of fp32 weights per layer: a CPU measure, not a host one.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/host_ops.py [--models vim_small dyvm_vim_small]
        [--paths cpu cuda-proxy] [--dtype fp32|bf16] [--rounds 7] [--iters 50] [--json FILE] [--profile MODEL]
        [--min-rows 1] [--baseline OTHER_CHECKOUT [--repeat 5]]
--baseline: the same measurement of another checkout's code (e.g. `git worktree add /tmp/base main`), the two
alternating in separate processes, side by side: before/after numbers from one machine in one sitting.
--min-rows 1: fp32 forwards take the tf32x3 kernel's paths (in_proj, out_proj, x_proj), whose threshold of 1024
token rows the proxy's shapes stay below.
--dry-run: a 4-layer model, few iterations (the test). Timings on a shared machine are noisy: compare runs of
the same sitting (interleaved), never numbers from different sessions.
"""
import argparse
import collections
import contextlib
import cProfile
import importlib
import io
import json
import os
import pkgutil
import pstats
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning threads on a shared CPU
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The code measured: this checkout, or the one named by HOST_OPS_CODE (--baseline runs this script on it).
CODE = os.path.abspath(os.environ.get("HOST_OPS_CODE", ROOT))
sys.path[:0] = [CODE, os.path.join(CODE, "mamba-1p1p1")]

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

PATHS = ("cpu", "cuda-proxy")
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
EXTRA_DEPTH = 4  # layers added at the end to difference out one layer's cost

# Leaf aten ops that launch no GPU kernel: views, metadata and allocations (a CUDA caching allocator hands
# out memory without a kernel).
NO_KERNEL = frozenset(f"aten::{n}" for n in (
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "_unsafe_view", "as_strided",
    "transpose", "t", "permute", "expand", "expand_as", "slice", "select", "unsqueeze", "squeeze", "split",
    "split_with_sizes", "chunk", "unbind", "alias", "detach", "_reshape_alias", "reshape", "view_as", "narrow",
    "movedim", "flatten", "unflatten", "resolve_conj", "resolve_neg", "lift_fresh", "result_type", "contiguous",
    "to", "_to_copy", "set_", "_has_compatible_shallow_copy_type", "is_nonzero", "dropout", "lift_fresh_copy",
    "numpy_T", "diagonal", "unfold", "_local_scalar_dense", "item", "sym_size", "sym_stride", "size", "stride"))


class _CountingLauncher:
    """Stands in for a Triton kernel: kernel[grid](...) counts the launch and returns. Its integer tensor arguments
    are zeroed: a skipped kernel that writes indices (the pruning stage's kept slots) must leave ones that later
    torch ops can index with; zeros are in range everywhere (the proxy's values mean nothing anyway)."""

    def __init__(self, name: str, counter: collections.Counter):
        self.name, self.counter = name, counter

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counter[self.name] += 1
            for a in args:
                if isinstance(a, torch.Tensor) and not a.is_floating_point():
                    a.numpy()[...] = 0  # (through numpy: no aten op the profiler would count)
        return launch


def kernel_modules() -> list:
    """The modules whose Triton kernels the CUDA path launches (the proxy counts and skips their launches): the
    conv's kernel file and every module of mamba_ssm.ops.triton, found rather than listed, so a new kernel file
    is counted too (and an older checkout measured with --baseline has what it has)."""
    import mamba_ssm.ops.triton as kernels

    return ["causal_conv1d.triton_causal_conv1d"] + [f"{kernels.__name__}.{m.name}"
                                                     for m in pkgutil.iter_modules(kernels.__path__)]


@contextlib.contextmanager
def cuda_proxy(counter: collections.Counter):
    """CPU tensors take the CUDA path (the ops' Triton branch); Triton launches are counted, not run."""
    from causal_conv1d.kernel_utils import triton_on_cpu

    saved = []
    for name in kernel_modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).copy().items():
            if attr.endswith("_kernel") and hasattr(value, "__getitem__") and callable(getattr(value, "run", None)):
                saved.append((module, attr, value))
                setattr(module, attr, _CountingLauncher(attr, counter))
    try:
        with triton_on_cpu():
            yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def build(name: str, depth_extra: int, args):
    """The registered model `name` at the proxy shapes of `args`, optionally `depth_extra` layers deeper (the
    extra layers come after the last pruning stage, so the pruning stages stay where the model has them).
    --dry-run: 4 layers, pruning before layers 1, 2, 3."""
    import dyvm  # noqa: F401  (registers the names)
    from dyvm.models.registry import create_model

    if args.dry_run:
        depth, pruning_loc = 4, (1, 2, 3)
    else:
        probe = create_model(name)
        depth, dyvm_cfg = probe.cfg.depth, getattr(probe, "dyvm_cfg", None)
        pruning_loc = dyvm_cfg.pruning_loc if dyvm_cfg is not None else None
        del probe
    kw = dict(img_size=args.img_size, patch_size=args.patch_size, num_classes=10, depth=depth + depth_extra)
    if args.embed_dim:
        kw["embed_dim"] = args.embed_dim
    if name.startswith("dyvm_"):
        kw["pruning_loc"] = pruning_loc  # the model's own locations, also for the deeper twin
    torch.manual_seed(0)
    return create_model(name, **kw).eval()


def _autocast(dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _is_aten(event) -> bool:
    return event.name.startswith("aten::")


def _launches(event) -> bool:
    """An aten op that launches a kernel itself: not a view or allocation, and none of the ops it calls does
    anything but views and allocations (linear -> addmm counts once, at the addmm or its bias copy)."""
    return event.name not in NO_KERNEL and all(c.name in NO_KERNEL for c in event.cpu_children if _is_aten(c))


def count_ops(model, x, dtype, proxy: bool) -> dict:
    """One forward under torch.profiler (no dispatch mode: the path is the eager one): launches, dispatched
    ops, Triton launches, and the kernel-launching ops by name."""
    triton = collections.Counter()
    with (cuda_proxy(triton) if proxy else contextlib.nullcontext()), torch.no_grad(), _autocast(dtype):
        model(x)  # warm (weight caches filled)
        triton.clear()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x)
    events = [e for e in prof.events() if _is_aten(e)]
    nested = {id(c) for e in events for c in e.cpu_children}
    dispatched = sum(1 for e in events if id(e) not in nested)
    kernels = collections.Counter(e.name for e in events if _launches(e))
    kernels.update({f"triton::{k}": v for k, v in triton.items()})
    return {"launches": sum(kernels.values()), "triton": sum(triton.values()), "dispatched": dispatched,
            "kernels": dict(kernels.most_common())}


def count_calls(model, x, dtype, proxy: bool) -> int:
    """Python function calls (built-ins included) of one forward, by cProfile."""
    with (cuda_proxy(collections.Counter()) if proxy else contextlib.nullcontext()), torch.no_grad(), \
            _autocast(dtype):
        model(x)
        prof = cProfile.Profile()
        prof.enable()
        model(x)
        prof.disable()
    return pstats.Stats(prof).total_calls


def profile_text(model, x, dtype, proxy: bool, forwards: int = 20, limit: int = 30) -> str:
    """cProfile of `forwards` forwards, by own time: where the host time goes."""
    with (cuda_proxy(collections.Counter()) if proxy else contextlib.nullcontext()), torch.no_grad(), \
            _autocast(dtype):
        model(x)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(forwards):
            model(x)
        prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(limit)
    return text.getvalue()


def host_times(runs: dict, x, dtype, proxy: bool, rounds: int, iters: int) -> dict:
    """Median over `rounds` of the mean host time (us) of `iters` forwards, the models interleaved per round."""
    samples = {name: [] for name in runs}
    with (cuda_proxy(collections.Counter()) if proxy else contextlib.nullcontext()), torch.no_grad(), \
            _autocast(dtype):
        for model in runs.values():
            for _ in range(3):
                model(x)
        for _ in range(rounds):
            for name, model in runs.items():
                start = time.perf_counter()
                for _ in range(iters):
                    model(x)
                samples[name].append((time.perf_counter() - start) / iters * 1e6)
    return {name: statistics.median(s) for name, s in samples.items()}


def per_layer(base: dict, deeper: dict, depth: int) -> dict:
    """{quantity: (per forward, per plain layer, fixed)} from the model and its EXTRA_DEPTH-deeper twin."""
    out = {}
    for key in base:
        layer = (deeper[key] - base[key]) / EXTRA_DEPTH
        out[key] = {"forward": base[key], "layer": layer, "fixed": base[key] - depth * layer}
    return out


def measure(args) -> dict:
    dtype = DTYPES[args.dtype]
    if args.min_rows is not None:  # (the fp32 Linear kernel's threshold: its path on the proxy's few tokens)
        from mamba_ssm.ops import linear_fp32

        linear_fp32.MIN_ROWS = args.min_rows
    results = {}
    for path in args.paths:
        proxy = path == "cuda-proxy"
        models = {name: (build(name, 0, args), build(name, EXTRA_DEPTH, args)) for name in args.models}
        x = torch.randn(1, 3, args.img_size, args.img_size)
        flat = {f"{n}/{i}": m for n, pair in models.items() for i, m in enumerate(pair)}
        times = host_times(flat, x, dtype, proxy, args.rounds, args.iters)
        for name, (model, deeper) in models.items():
            counts = [count_ops(m, x, dtype, proxy) for m in (model, deeper)]
            calls = [count_calls(m, x, dtype, proxy) for m in (model, deeper)]
            base = {"launches": counts[0]["launches"], "triton": counts[0]["triton"],
                    "dispatched": counts[0]["dispatched"], "calls": calls[0], "host_us": times[f"{name}/0"]}
            deep = {"launches": counts[1]["launches"], "triton": counts[1]["triton"],
                    "dispatched": counts[1]["dispatched"], "calls": calls[1], "host_us": times[f"{name}/1"]}
            results[f"{name}/{path}"] = {"depth": model.cfg.depth, **per_layer(base, deep, model.cfg.depth),
                                         "kernels": counts[0]["kernels"]}
            if args.profile == name:
                print(f"===== cProfile of {name} on {path}\n{profile_text(model, x, dtype, proxy)}")
    return results


def compare(args, argv) -> dict:
    """--baseline DIR: this script on this checkout's code and on DIR's, alternately, each run a process of its
    own (`--repeat` times, each with --rounds 1 so the two checkouts' runs interleave): the counts of one run
    each and the median host time over the runs, side by side."""
    import subprocess
    import tempfile

    passthrough = _without(argv, "--baseline", "--repeat", "--json", "--rounds")
    runs = {"baseline": [], "this": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            for label, code in (("baseline", args.baseline), ("this", ROOT)):
                out = os.path.join(tmp, f"{label}{i}.json")
                env = dict(os.environ, HOST_OPS_CODE=code)
                subprocess.run([sys.executable, os.path.abspath(__file__), *passthrough, "--rounds", "1",
                                "--json", out], env=env, check=True, stdout=subprocess.DEVNULL)
                with open(out) as f:
                    runs[label].append(json.load(f)["results"])
    merged = {}
    for label, results in runs.items():
        for name in results[0]:
            r = results[0][name]
            r["host_us"] = {part: statistics.median(res[name]["host_us"][part] for res in results)
                            for part in ("forward", "layer", "fixed")}
            merged[f"{name} [{label}]"] = r
    return dict(sorted(merged.items()))


def _without(argv, *options) -> list:
    """argv without the named options and their values."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in options:
            skip = True
        else:
            out.append(a)
    return out


def table(results: dict) -> str:
    keys = ("launches", "triton", "dispatched", "calls", "host_us")
    lines = [f"{'model/path':36s} {'':8s} " + " ".join(f"{k:>10s}" for k in keys)]
    for name, r in results.items():
        for part in ("forward", "layer", "fixed"):
            lines.append(f"{name if part == 'forward' else '':36s} {part:8s} "
                         + " ".join(f"{r[k][part]:10.1f}" for k in keys))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["vim_small", "dyvm_vim_small"])
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype (CPU autocast)")
    p.add_argument("--embed-dim", type=int, default=64, help="0: the model's own width")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    p.add_argument("--profile", default=None, help="also print a cProfile of this model's forwards")
    p.add_argument("--min-rows", type=int, default=None,
                   help="fp32: the token rows from which in_proj / out_proj / x_proj take the tf32x3 kernel "
                        "(mamba_ssm.ops.linear_fp32.MIN_ROWS, 1024; the proxy's tiny inputs stay below it)")
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("--dry-run", action="store_true", help="4-layer tiny models, few iterations (the test)")
    p.add_argument("--baseline", default=None, help="another checkout: measure its code too, interleaved (compare)")
    p.add_argument("--repeat", type=int, default=5, help="with --baseline: processes per checkout")
    args = p.parse_args(argv)
    if args.dry_run:
        args.models = ["vim_tiny", "dyvm_vim_tiny"]
        args.rounds, args.iters, args.embed_dim = 2, 2, 32
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = compare(args, sys.argv[1:] if argv is None else argv) if args.baseline else measure(args)
    finally:
        torch.set_num_threads(threads)
    print(f"torch {torch.__version__} | {args.dtype} | batch 1, img {args.img_size}, patch {args.patch_size}, "
          f"embed_dim {args.embed_dim or 'of the model'} | threads {args.threads} | code {CODE}"
          + (f" | baseline {args.baseline}, {args.repeat} interleaved processes each" if args.baseline else ""))
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
