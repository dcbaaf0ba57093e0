"""Reports: what main.py --eval measures and prints (eval_report, summarize_eval), and the demo report.

The --eval report (eval.json): top-1 / top-5 of the raw and the EMA weights, tokens kept per stage, the
realised block keep ratio, MACs in both conventions, parameters, and images/s of the model and, for a DyVM, of
its dense twin (the teacher's shape with fresh weights: timing and FLOPs need no teacher weights, so a teacher
file that moved is only a note).

The demo report, dense Vim and DyVM side by side, with figures:

    python -m dyvm.report --dense output/demo/dense --dyvm output/demo/dyvm --out output/demo

reads each run's eval.json (main.py --eval), log.txt and args.yaml; draws the tokens the trained DyVM keeps
over validation images at each stage and the training curves; writes report.md and report.json.
"""
import json
import os
import sys
from typing import Optional

import torch
import torch.nn as nn

from dyvm.visualize import plot_accuracy_vs_flops, plot_kept_tokens, plot_training_curves


# ----------------------------------------------------------------------------- main.py --eval
def teacher_note(path: Optional[str]) -> str:
    """How the --eval report names the dense baseline: the teacher file it stands for, or why there is none."""
    if not path:
        return "no teacher recorded: the dense twin of the model (fresh weights)"
    if not os.path.isfile(path):
        return f"teacher {path} not found: its dense twin (fresh weights; timing and FLOPs need no weights)"
    return f"dense twin of the teacher {path} (timing and FLOPs need no weights)"


def dense_baseline(model: nn.Module, teacher_path: Optional[str]) -> tuple:
    """(the DyVM's dense twin on its device, its report entry: parameters and FLOPs; eval_report adds images/s)."""
    from dyvm.flops import nominal_macs
    from dyvm.models.registry import dense_twin

    device = next(model.parameters()).device
    dense = dense_twin(model).to(device)
    res = {"path": teacher_path or None, "weights": teacher_note(teacher_path),
           "parameters": sum(p.numel() for p in dense.parameters())}
    res["gmacs_paper"], res["gmacs_full"] = (v / 1e9 for v in nominal_macs(dense))
    return dense, res


def eval_report(args, model: nn.Module, ema_model: Optional[nn.Module], val_loader, eval_kw: dict, rank: int,
                teacher_path: Optional[str]) -> dict:
    """What main.py --eval writes to eval.json. eval_kw: dyvm.engine.evaluate's options; images/s are timed
    on rank 0 only (--throughput), also as CUDA-graph replays on a GPU (--throughput-cuda-graph); a DyVM's
    with its dense twin's, the two interleaved (dyvm.benchmark.measure_interleaved)."""
    from dyvm.benchmark import measure_interleaved, paired_speedup
    from dyvm.engine import evaluate

    device = next(model.parameters()).device
    res = {"model": args.model, "parameters": sum(p.numel() for p in model.parameters()),
           "num_patches": model.cfg.num_patches}
    res["raw"] = evaluate(model, val_loader, device, desc="eval raw", **eval_kw)
    if ema_model is not None:
        res["ema"] = evaluate(ema_model, val_loader, device, desc="eval EMA", **eval_kw)
    timed = {"model": model}
    if getattr(model, "dyvm_cfg", None) is not None:  # the dense teacher's shape, timed in the same run
        timed["teacher"], res["teacher"] = dense_baseline(model, teacher_path)
    if not args.throughput or rank != 0:
        return res
    timing = dict(batch_size=args.throughput_batch_size, img_size=args.input_size, in_chans=args.in_chans,
                  device=device, dtype=eval_kw.get("amp_dtype"), warmup=max(2, args.throughput_iters // 3),
                  iters=args.throughput_iters)
    modes = ["eager"] + (["cuda_graph"] if args.throughput_cuda_graph and device.type == "cuda" else [])
    for mode in modes:
        key = "throughput" + ("" if mode == "eager" else "_" + mode)
        got = measure_interleaved(timed, mode=mode, **timing)
        res[key] = got["model"]
        if "teacher" in got:
            res["teacher"][key] = got["teacher"]
            res["speedup_vs_teacher" + key[len("throughput"):]] = paired_speedup(got["model"], got["teacher"])
    return res


def pruning_lines(stats: dict, num_patches: Optional[int] = None) -> list:
    """The report lines of what a DyVM ran (tokens kept per stage, block keep ratio), for the evaluation stats
    that hold them (classification and segmentation alike); num_patches: the patches the tokens are kept of."""
    lines = []
    if "tokens_kept_per_stage" in stats:
        of = f" of {num_patches}" if num_patches else ""
        lines.append(f"  tokens kept per stage: {stats['tokens_kept_per_stage']}{of} "
                     f"(ratios {stats['token_keep_ratio_per_stage']})")
    if "block_keep_ratio" in stats:
        lines.append(f"  block keep ratio: {stats['block_keep_ratio']:.4f} overall; per layer [fwd, bwd]: "
                     f"{stats['block_keep_per_layer']}")
    return lines


def summarize_eval(res: dict) -> str:
    """The --eval report as the lines main.py prints."""
    raw = res["raw"]
    lines = [f"{res['model']}: {res['parameters']:,} parameters, {raw['num_images']} images",
             f"  top-1 {raw['acc1']:.2f}  top-5 {raw['acc5']:.2f}  (raw model)"]
    if "ema" in res:
        lines.append(f"  top-1 {res['ema']['acc1']:.2f}  top-5 {res['ema']['acc5']:.2f}  (EMA)")
    lines.append(f"  MACs/image as run: {raw['gmacs_paper']:.4f} G paper convention (one scan direction), "
                 f"{raw['gmacs_full']:.4f} G full (both directions)")
    lines += pruning_lines(raw)
    t = res.get("teacher")
    if t is not None:
        lines.append(f"  dense baseline, {t['weights']}: {t['gmacs_paper']:.4f} G paper / {t['gmacs_full']:.4f} G full")
    if "throughput" in res:
        tp = res["throughput"]
        text = f"  images/s: model {tp['images_per_s']:.1f}"
        if t is not None and "throughput" in t:
            text += (f", dense baseline {t['throughput']['images_per_s']:.1f} (x{res['speedup_vs_teacher']:.2f}; the two "
                     f"timed in turns)")
        lines.append(text + f" (batch {tp['batch_size']}, median of {tp['iters']} timed batches)")
    if "throughput_cuda_graph" in res:
        text = f"  images/s, CUDA graph: model {res['throughput_cuda_graph']['images_per_s']:.1f}"
        if t is not None and "throughput_cuda_graph" in t:
            text += (f", dense baseline {t['throughput_cuda_graph']['images_per_s']:.1f} "
                     f"(x{res['speedup_vs_teacher_cuda_graph']:.2f})")
        lines.append(text + " (the GPU's throughput without Python's launch overhead)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the demo report
def read_log(run_dir: str) -> list:
    path = os.path.join(run_dir, "log.txt")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_eval(run_dir: str) -> dict:
    path = os.path.join(run_dir, "eval.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: run main.py --eval with --output_dir {run_dir} first")
    with open(path) as f:
        return json.load(f)


@torch.no_grad()
def kept_tokens_figure(dyvm_dir: str, path: str, num_images: int = 6) -> None:
    """Load the DyVM run's best checkpoint and draw the eval-mode decisions on the first validation images."""
    from dyvm.checkpoint import load_checkpoint
    from dyvm.config import parse_args
    from dyvm.data import build_datasets
    from dyvm.engine import build_model

    args = parse_args(["--config", os.path.join(dyvm_dir, "args.yaml")])
    splits = build_datasets(args)
    model = build_model(args, args.nb_classes or splits.num_classes)
    load_checkpoint(model, os.path.join(dyvm_dir, "best_checkpoint.pth"))  # one-line errors for a bad file
    model.eval()
    # one image of each of the first classes, so the figure shows different shapes
    picked, seen = [], set()
    for i in range(len(splits.val)):
        img, target = splits.val[i]
        if target not in seen:
            seen.add(target)
            picked.append((img, target))
        if len(picked) == num_images:
            break
    images = torch.stack([p[0] for p in picked])
    out = model.forward_aux(images)
    pred = out.logits.argmax(1).tolist()
    titles = [f"{splits.class_names[t]} -> {splits.class_names[p]}" for (_, t), p in zip(picked, pred)]
    plot_kept_tokens(images, out.decisions, model.cfg.grid_size, titles, path)


def _fmt(v, spec=".2f"):
    return "n/a" if v is None else format(v, spec)


def build_report(dense_dir: str, dyvm_dir: str, out_dir: str, wall_clock_s: float = None) -> dict:
    os.makedirs(os.path.join(out_dir, "figures"), exist_ok=True)
    dense, dyn = read_eval(dense_dir), read_eval(dyvm_dir)
    logs = {"dense Vim": read_log(dense_dir), "DyVM": read_log(dyvm_dir)}
    plot_training_curves(logs, os.path.join(out_dir, "figures", "training_curves.png"))
    kept_tokens_figure(dyvm_dir, os.path.join(out_dir, "figures", "kept_tokens.png"))
    plot_accuracy_vs_flops({"dense Vim": (dense["raw"]["gmacs_paper"], dense["raw"]["acc1"]),
                            "DyVM": (dyn["raw"]["gmacs_paper"], dyn["raw"]["acc1"])},
                           os.path.join(out_dir, "figures", "accuracy_vs_flops.png"))
    # images/s: both from the DyVM --eval run, where the model and its dense teacher were timed together
    dyn_ips = dyn.get("throughput", {}).get("images_per_s")
    teacher_ips = dyn.get("teacher", {}).get("throughput", {}).get("images_per_s")
    summary = {
        "dense": {"top1": dense["raw"]["acc1"], "top1_ema": dense.get("ema", {}).get("acc1"),
                  "top5": dense["raw"]["acc5"], "gmacs_paper": dense["raw"]["gmacs_paper"],
                  "gmacs_full": dense["raw"]["gmacs_full"], "parameters": dense["parameters"],
                  "images_per_s": teacher_ips},
        "dyvm": {"top1": dyn["raw"]["acc1"], "top1_ema": dyn.get("ema", {}).get("acc1"), "top5": dyn["raw"]["acc5"],
                 "gmacs_paper": dyn["raw"]["gmacs_paper"], "gmacs_full": dyn["raw"]["gmacs_full"],
                 "parameters": dyn["parameters"], "images_per_s": dyn_ips,
                 "tokens_kept_per_stage": dyn["raw"].get("tokens_kept_per_stage"),
                 "block_keep_ratio": dyn["raw"].get("block_keep_ratio"),
                 "block_keep_per_layer": dyn["raw"].get("block_keep_per_layer")},
        "num_val_images": dyn["raw"]["num_images"], "wall_clock_s": wall_clock_s,
    }
    d, y = summary["dense"], summary["dyvm"]
    cut = lambda a, b: f"{100 * (1 - b / a):.1f}% fewer" if a else "n/a"  # noqa: E731
    speed = f"{dyn_ips / teacher_ips:.2f}x" if dyn_ips and teacher_ips else "n/a"
    lines = [
        "# DyVM demo report (embedded Animal-MNIST, CPU)", "",
        f"Validation set: {summary['num_val_images']} images. MACs per image counted from what each model ran "
        "(paper convention: one scan direction per layer, as in the published tables; full: both directions).",
        "", "| | dense Vim (teacher) | DyVM | change |", "|---|---|---|---|",
        f"| top-1 (raw) | {d['top1']:.2f} | {y['top1']:.2f} | {y['top1'] - d['top1']:+.2f} points |",
        f"| top-1 (EMA) | {_fmt(d['top1_ema'])} | {_fmt(y['top1_ema'])} | |",
        f"| top-5 | {d['top5']:.2f} | {y['top5']:.2f} | |",
        f"| MACs, paper convention | {d['gmacs_paper'] * 1e3:.2f} M | {y['gmacs_paper'] * 1e3:.2f} M | "
        f"{cut(d['gmacs_paper'], y['gmacs_paper'])} |",
        f"| MACs, full (both directions) | {d['gmacs_full'] * 1e3:.2f} M | {y['gmacs_full'] * 1e3:.2f} M | "
        f"{cut(d['gmacs_full'], y['gmacs_full'])} |",
        f"| parameters | {d['parameters']:,} | {y['parameters']:,} | |",
        f"| images/s (same run, CPU) | {_fmt(teacher_ips, '.1f')} | {_fmt(dyn_ips, '.1f')} | {speed} |",
        "", f"Tokens kept per stage (of {dyn.get('num_patches', '')} patches, mean over images): "
        f"{y['tokens_kept_per_stage']}", "",
        f"Block keep ratio realised on the validation set: {_fmt(y['block_keep_ratio'], '.3f')} overall; "
        f"per layer [forward, backward]: {y['block_keep_per_layer']}", "",
        "![kept tokens](figures/kept_tokens.png)", "",
        "Tokens kept at each stage over validation images (dropped patches tinted red; row label: true -> "
        "predicted class).", "", "![training curves](figures/training_curves.png)", "",
        "![accuracy vs FLOPs](figures/accuracy_vs_flops.png)", ""]
    return write_report(out_dir, lines, summary, wall_clock_s)


def write_report(out_dir: str, lines: list, summary: dict, wall_clock_s: Optional[float] = None) -> dict:
    """report.md (the lines, and the demo's wall-clock time if given) and report.json (summary) in out_dir."""
    if wall_clock_s is not None:
        lines = lines + [f"Whole demo (both trainings, evaluations, report): {wall_clock_s / 60:.1f} minutes."]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv=None) -> int:
    from dyvm.cli import ArgumentParser

    p = ArgumentParser("python -m dyvm.report", description="dense vs DyVM demo report with figures")
    p.add_argument("--dense", required=True, help="output_dir of the dense run (with eval.json)")
    p.add_argument("--dyvm", required=True, help="output_dir of the DyVM run (with eval.json, best_checkpoint.pth)")
    p.add_argument("--out", required=True)
    p.add_argument("--wall-clock-s", type=float, default=None, help="the demo's total time, for the report")
    args = p.parse_args(argv)
    from dyvm.checkpoint import CheckpointError
    from dyvm.config import ConfigError
    from dyvm.data import DataError
    from dyvm.models.registry import ModelOptionError

    try:
        summary = build_report(args.dense, args.dyvm, args.out, args.wall_clock_s)
    except (FileNotFoundError, ConfigError, CheckpointError, DataError, ModelOptionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(open(os.path.join(args.out, "report.md")).read().split("![kept tokens]")[0].rstrip())
    print(f"report: {os.path.join(args.out, 'report.md')} (figures in {os.path.join(args.out, 'figures')})")
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
