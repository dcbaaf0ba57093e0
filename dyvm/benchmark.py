"""Inference throughput of dense Vim and DyVM, measured in one process so the numbers compare.

Method: model.eval(), no_grad, a fixed random batch on the device, `warmup` untimed forwards, then `iters`
timed forwards, each bracketed by device synchronisation; images/s = batch / median batch time. The models of a
run take turns, a few forwards each (measure_interleaved): the GPU machines' hosts change pace within a minute,
and eager inference is bound by the host, so models timed one after the other would be compared at different
paces. DyVM's speed-up over its dense model is the median of their round-by-round ratios.

An untrained DyVM (gate heads at weight 0 / bias 5) would run every scan direction, which is not what a
trained one does. `--block-keep-ratio` gives it a realistic per-image gate pattern: each gate head gets random
weights, and its biases are calibrated on a random batch so that the chosen fraction of (image, direction)
pairs is on, differing from image to image (AUTHORS_REALISED_BLOCK_KEEP_RATIO: the fraction the authors'
trained DyVM-Vim-S ran on ImageNet val). Token keep is top-k, so token counts are realistic already.

    python -m dyvm.benchmark --models vim_small dyvm_vim_small --batch-sizes 128 --dtypes fp32 bf16 \
        --block-keep-ratio authors --json benchmarks/e2e_h100.json
"""
import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from typing import Optional, Sequence

import torch
import torch.nn as nn

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# The realised block keep ratio (mean of the eval gates) of the authors' trained DyVM-Vim-S on ImageNet val:
# what an untrained model's gates are calibrated to when a timing should look like the trained model's.
AUTHORS_REALISED_BLOCK_KEEP_RATIO = 0.735


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MODES = ("eager", "cuda_graph", "compile")


def _runner(model: nn.Module, x: torch.Tensor, dtype: Optional[torch.dtype], mode: str):
    """A no-argument callable running one forward of `model` on x the way `mode` says:
    eager: plain calls; cuda_graph: replays of a captured CUDA graph (dyvm.serving), the GPU's throughput without
    Python and launch overhead; compile: torch.compile(model) (inductor), compiled by the warm-up calls."""
    from dyvm.serving import autocast_context, graphed

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "cuda_graph":
        if x.device.type != "cuda":
            raise ValueError("--cuda-graph needs a CUDA device")
        fast = graphed(model, dtype=dtype)
        return lambda: fast(x)
    fn = torch.compile(model) if mode == "compile" else model

    def run():
        with autocast_context(x.device.type, dtype):
            return fn(x)
    return run


def measure_throughput(model: nn.Module, batch_size: int, img_size: int, in_chans: int, device,
                       dtype: Optional[torch.dtype] = None, warmup: int = 10, iters: int = 30,
                       mode: str = "eager", seed: int = 0) -> dict:
    """Median images/s of model(x) on a random batch; dtype = autocast dtype (None: fp32); mode: eager,
    cuda_graph or compile (see _runner). Eager small models and bf16 are bound by the host's launch work:
    cuda_graph shows what the GPU can do, which is what a deployment through dyvm.serving gets. To compare
    models, time them together: measure_interleaved."""
    return measure_interleaved({"model": model}, batch_size, img_size, in_chans, device, dtype, warmup, iters, mode,
                               seed)["model"]


# Timed forwards a model runs in its turn before the next model's (measure_interleaved)
ROUND = 5


@torch.no_grad()
def measure_interleaved(models: dict, batch_size: int, img_size: int, in_chans: int, device,
                        dtype: Optional[torch.dtype] = None, warmup: int = 10, iters: int = 30,
                        mode: str = "eager", seed: int = 0) -> dict:
    """measure_throughput of several models {name: model} on the same batch, their timed forwards interleaved:
    each runs ROUND forwards in turn, the order reversed every round, until each has run `iters`. The GPU
    machines' hosts change pace by up to 2x within a minute, and eager inference is bound by the host: models
    timed one after the other are compared at different paces, interleaved ones at the same. Per name: images/s
    (batch / median time to the device's end), median_host_s (until the call returned: the host's part),
    round_s (each round's median batch time: paired_speedup compares two models round by round). The inputs come
    from `seed` alone (a DyVM's speed follows its decisions, which follow its inputs)."""
    device = torch.device(device)
    was_training = {name: m.training for name, m in models.items()}
    x = torch.randn(batch_size, in_chans, img_size, img_size, generator=torch.Generator().manual_seed(seed))
    x = x.to(device)
    times = {name: [] for name in models}
    rounds = {name: [] for name in models}
    try:
        runs = {}
        for name, m in models.items():
            m.eval()
            runs[name] = _runner(m, x, dtype, mode)
            for _ in range(warmup):
                runs[name]()
        order, done = list(runs), 0
        while done < iters:
            n = min(ROUND, iters - done)
            for name in order:
                timed = [_timed_call(runs[name], device) for _ in range(n)]
                times[name] += timed
                rounds[name].append(statistics.median(total for _, total in timed))
            order.reverse()
            done += n
    finally:
        for name, m in models.items():
            m.train(was_training[name])
    results = {}
    for name in models:
        median = statistics.median(total for _, total in times[name])
        results[name] = {"images_per_s": batch_size / median, "median_batch_s": median,
                         "median_host_s": statistics.median(host for host, _ in times[name]),
                         "round_s": rounds[name], "batch_size": batch_size, "iters": iters, "warmup": warmup,
                         "mode": mode}
    return results


def _timed_call(run, device: torch.device) -> tuple:
    """(seconds until run() returned, seconds until the device finished it), from a synchronised start."""
    _sync(device)
    start = time.perf_counter()
    run()
    returned = time.perf_counter()
    _sync(device)
    return returned - start, time.perf_counter() - start


def paired_speedup(result: dict, baseline: dict) -> float:
    """result's images/s over baseline's, two measure_interleaved results of one call: the median of their
    round-by-round ratios (each round's pair ran at one pace of the host); for results timed apart, the ratio of
    their images/s."""
    a, b = result.get("round_s"), baseline.get("round_s")
    if a and b and len(a) == len(b):
        return statistics.median(base / mine for mine, base in zip(a, b))
    return result["images_per_s"] / baseline["images_per_s"]


@torch.no_grad()
def profile_top(model: nn.Module, batch_size: int, img_size: int, in_chans: int, device,
                dtype: Optional[torch.dtype] = None, top: int = 15) -> str:
    """torch.profiler table of one warm batch: the `top` ops by their own device time (CPU time on CPU),
    to see where a model's time goes (e.g. why fewer FLOPs did not give the expected speed)."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    model.eval()
    x = torch.randn(batch_size, in_chans, img_size, img_size, device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        model(x)
        _sync(device)
        with profile(activities=activities) as prof:
            model(x)
            _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top)


@torch.no_grad()
def calibrate_gates(model: nn.Module, keep: float, batch_size: int, img_size: int, in_chans: int, device,
                    seed: int = 0) -> float:
    """Give an untrained DyVM's gate heads random weights and biases such that about `keep` of the (image,
    direction) pairs run, varying per image. Layer by layer (a layer's inputs depend on the earlier gates):
    the bias puts the threshold at the (1 - keep) quantile of that direction's logits over a random batch.
    A direction whose logit cannot depend on the image (the first layer's: its class-token row has not mixed
    with any patch yet) is switched on or off as a whole, on with probability `keep`.
    Returns the realised fraction on a fresh random batch."""
    heads = [layer.mixer.block_head for layer in model.layers if getattr(layer.mixer, "block_head", None) is not None]
    if not heads:
        raise ValueError("this model has no gate heads (block selection off): --block-keep-ratio does not apply")
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"--block-keep-ratio must be in [0, 1], got {keep}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    model.eval()
    x = torch.randn(batch_size, in_chans, img_size, img_size, generator=g).to(device)
    for head in heads:
        head.weight.copy_((torch.randn(head.weight.shape, generator=g) / head.in_features ** 0.5).to(head.weight))
        head.bias.fill_(-1e4)  # off until calibrated
    for head in heads:
        seen = {}
        hook = head.register_forward_hook(lambda m, i, o: seen.setdefault("logits", (o - m.bias).float()))
        model(x)
        hook.remove()
        logits = seen["logits"]  # (batch, 2), bias-free
        bias = torch.empty(2)
        for d in range(2):
            col = logits[:, d]
            if float(col.std()) < 1e-5 * (float(col.abs().mean()) + 1e-12):
                on = torch.rand((), generator=g).item() < keep
                bias[d] = -float(col.mean()) + (1.0 if on else -1.0)
            else:
                bias[d] = -float(torch.quantile(col, 1.0 - keep)) if 0 < keep < 1 else (1e4 if keep == 1 else -1e4)
        head.bias.copy_(bias.to(head.bias))
    out = model.forward_aux(torch.randn(batch_size, in_chans, img_size, img_size, generator=g).to(device))
    return float((out.gates > 0.5).float().mean())


def environment() -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(), "host": platform.node()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    else:
        info["device"] = f"cpu ({torch.get_num_threads()} threads)"
    return info


def build_model(name: str, device, img_size: int = 224, token_keep_ratio: Optional[float] = None,
                block_keep_ratio: Optional[float] = None, calib_batch: int = 64):
    """(timm name, eval model on device, realised block keep ratio or None) for any name the registry knows;
    a DyVM gets token_keep_ratio (default: the registry's), and with block_keep_ratio its gate heads
    calibrated so that this fraction of the scan directions runs (calibrate_gates)."""
    from dyvm.models.registry import create_model, resolve

    spec = resolve(name)
    model = create_model(name, img_size=img_size, token_keep_ratio=token_keep_ratio).to(device).eval()
    realised = None
    if spec.dynamic and block_keep_ratio is not None:
        realised = calibrate_gates(model, block_keep_ratio, calib_batch, img_size, 3, device)
    return spec.timm_name, model, realised


def run(models: Sequence[str], batch_sizes: Sequence[int], dtypes: Sequence[str], img_size: int, device: str,
        block_keep_ratio: Optional[float], token_keep_ratio: Optional[float], warmup: int, iters: int,
        profile: int = 0, modes: Sequence[str] = ("eager",), seed: int = 0) -> list:
    """Every model timed at every dtype, batch size and mode, the models of one setting interleaved
    (measure_interleaved)."""
    built = {}
    for name in models:
        torch.manual_seed(seed)  # the same weights and gates in every run: DyVM's speed follows its gates
        built[name] = build_model(name, device, img_size, token_keep_ratio, block_keep_ratio,
                                  min(64, max(batch_sizes)))
    rows = []
    for dt in dtypes:
        for bs in batch_sizes:
            for mode in modes:
                results = measure_interleaved({name: model for name, (_, model, _) in built.items()}, bs, img_size,
                                              3, device, DTYPES[dt], warmup, iters, mode, seed)
                for name, r in results.items():
                    timm_name, model, realised = built[name]
                    rows.append({"model": timm_name, "dtype": dt, "img_size": img_size,
                                 "block_keep_ratio": realised, **r})
                    print(f"{timm_name:16s} {dt:5s} batch {bs:4d} {mode:10s}: {r['images_per_s']:9.1f} images/s, "
                          f"host {1e3 * r['median_host_s']:.2f} of {1e3 * r['median_batch_s']:.2f} ms a batch"
                          + (f" (realised block keep ratio {realised:.3f})" if realised is not None else "")
                          + (HOST_BOUND_NOTE if host_bound(r, device) else ""), flush=True)
                    if profile:
                        print(profile_top(model, bs, img_size, 3, device, DTYPES[dt], profile), flush=True)
    return rows


HOST_BOUND_NOTE = "; bound by the host: graphed calls (--modes cuda_graph, dyvm.serving.graphed) take the GPU's pace"


def host_bound(result: dict, device) -> bool:
    """Whether an eager GPU timing was set by the host: the call returned after 90% or more of the batch's time
    (the GPU waited for the host's launches)."""
    return (result.get("mode", "eager") == "eager" and torch.device(device).type == "cuda"
            and result["median_host_s"] >= 0.9 * result["median_batch_s"])


def speedups(rows: list) -> list:
    """DyVM images/s over the dense model of the same size, dtype, batch, image size and mode (paired_speedup:
    round by round, as they were timed together)."""
    from dyvm.models.registry import resolve

    def key(r, model):
        return model, r["dtype"], r["batch_size"], r["img_size"], r.get("mode", "eager")
    dense = {key(r, r["model"]): r for r in rows}
    out = []
    for r in rows:
        spec = resolve(r["model"])
        if spec.dynamic:
            base = dense.get(key(r, spec.dense_name))
            if base:
                out.append({"model": r["model"], "dtype": r["dtype"], "batch_size": r["batch_size"],
                            "mode": r.get("mode", "eager"), "speedup_vs_dense": paired_speedup(r, base)})
    return out


def _block_keep_ratio(text: str) -> float:
    """--block-keep-ratio: a fraction, or 'authors' for AUTHORS_REALISED_BLOCK_KEEP_RATIO."""
    if text == "authors":
        return AUTHORS_REALISED_BLOCK_KEEP_RATIO
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1] or 'authors', got {text!r}") from None


def main(argv=None) -> int:
    from dyvm.cli import ArgumentParser, flag_name
    from dyvm.config import add_tf32_flag, apply_tf32
    from dyvm.models.registry import DEFAULT_TOKEN_KEEP_RATIO, ModelOptionError, check_keep_ratios

    p = ArgumentParser("python -m dyvm.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["vim_small", "dyvm_vim_small"], help="names to time")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128], help="batch sizes to time")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES),
                   help="fp32, or autocast to bf16 / fp16")
    p.add_argument("--img-size", type=int, default=224, help="input resolution (square)")
    p.add_argument("--token-keep-ratio", type=float, default=DEFAULT_TOKEN_KEEP_RATIO,
                   help="DyVM: r in (0, 1]; the stages keep r, r^2, r^3 of the patches")
    p.add_argument("--block-keep-ratio", "--gate-keep", type=_block_keep_ratio, default=None,
                   help="DyVM: calibrate the untrained gates so that this fraction in [0, 1] of the (image, "
                        f"direction) pairs runs; 'authors' = {AUTHORS_REALISED_BLOCK_KEEP_RATIO}, the authors' "
                        "trained DyVM-Vim-S (--gate-keep: the old name)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to run")
    p.add_argument("--warmup", type=int, default=10, help="untimed forwards first")
    p.add_argument("--iters", type=int, default=30, help="timed forwards (median)")
    p.add_argument("--json", default="", help="write environment, rows and speed-ups here")
    p.add_argument("--modes", nargs="+", default=["eager"], choices=MODES,
                   help="eager calls, CUDA-graph replays (dyvm.serving: no Python or launch overhead) and/or "
                        "torch.compile (inductor; compiled during the warm-up)")
    p.add_argument("--cuda-graph", dest="modes", action="store_const", const=["cuda_graph"],
                   help="shorthand for --modes cuda_graph")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after each timing, print the N ops that take the most device time (torch.profiler)")
    p.add_argument("--seed", type=int, default=0,
                   help="torch's seed before each model is built: its weights, gate calibration and inputs, so that "
                        "runs (and revisions) time the same DyVM decisions")
    add_tf32_flag(p)
    args = p.parse_args(argv)
    apply_tf32(args, torch.device(args.device), print)
    try:
        check_keep_ratios(args.token_keep_ratio, None, args.block_keep_ratio, spell=flag_name)
    except ModelOptionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    env = environment()
    print(" | ".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    try:
        rows = run(args.models, args.batch_sizes, args.dtypes, args.img_size, args.device, args.block_keep_ratio,
                   args.token_keep_ratio, args.warmup, args.iters, args.profile, args.modes, args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ups = speedups(rows)
    for s in ups:
        print(f"{s['model']} {s['dtype']} batch {s['batch_size']} {s['mode']}: {s['speedup_vs_dense']:.2f}x the dense "
              "model")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "args": vars(args), "rows": rows, "speedups": ups}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
