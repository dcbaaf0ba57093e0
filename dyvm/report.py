"""The demo report: dense Vim and DyVM side by side, with figures.

    python -m dyvm.report --dense output/demo/dense --dyvm output/demo/dyvm --out output/demo

Reads each run's eval.json (main.py --eval), log.txt and args.yaml; draws the tokens the trained DyVM keeps
over validation images at each stage and the training curves; writes report.md and report.json.
"""
import argparse
import json
import os
import sys

import torch

from dyvm.visualize import plot_accuracy_vs_flops, plot_kept_tokens, plot_training_curves


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
    from dyvm.config import parse_args
    from dyvm.data import build_datasets
    from dyvm.engine import build_model

    args = parse_args(["--config", os.path.join(dyvm_dir, "args.yaml")])
    splits = build_datasets(args)
    model = build_model(args, args.nb_classes or splits.num_classes)
    state = torch.load(os.path.join(dyvm_dir, "best_checkpoint.pth"), map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
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
    if wall_clock_s is not None:
        lines.append(f"Whole demo (both trainings, evaluations, report): {wall_clock_s / 60:.1f} minutes.")
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser("python -m dyvm.report", description="dense vs DyVM demo report with figures")
    p.add_argument("--dense", required=True, help="output_dir of the dense run (with eval.json)")
    p.add_argument("--dyvm", required=True, help="output_dir of the DyVM run (with eval.json, best_checkpoint.pth)")
    p.add_argument("--out", required=True)
    p.add_argument("--wall-clock-s", type=float, default=None, help="the demo's total time, for the report")
    args = p.parse_args(argv)
    try:
        summary = build_report(args.dense, args.dyvm, args.out, args.wall_clock_s)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(open(os.path.join(args.out, "report.md")).read().split("![kept tokens]")[0].rstrip())
    print(f"report: {os.path.join(args.out, 'report.md')} (figures in {os.path.join(args.out, 'figures')})")
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
