"""The segmentation demo report: dense and DyVM segmenters side by side, with a figure.

    python -m dyvm.seg.report --dense output/demo-seg/dense --dyvm output/demo-seg/dyvm --out output/demo-seg

Reads each run's eval.json (`main.py seg --eval`), log.txt and args.yaml; draws sample validation scenes with
their ground truth, both predictions and the tokens the DyVM backbone kept at each stage; writes report.md and
report.json.
"""
import argparse
import json
import os
import sys

import torch

from dyvm.report import read_log, write_report
from dyvm.seg.visualize import plot_segmentation, predict_with_kept_tokens


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: run `main.py seg --eval --output_dir {os.path.dirname(path)}`")
    with open(path) as f:
        return json.load(f)


def _load_run(run_dir: str):
    from dyvm.seg.config import parse_args
    from dyvm.seg.data import build_seg_splits
    from dyvm.seg.run import build_model

    args = parse_args(["--config", os.path.join(run_dir, "args.yaml")])
    splits = build_seg_splits(args)
    model = build_model(args, args.nb_classes or splits.num_classes)
    state = torch.load(os.path.join(run_dir, "checkpoint.pth"), map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    return args, splits, model.eval()


@torch.no_grad()
def kept_by_region(args, splits, model, num_images: int = 100) -> dict:
    """Scenes only: per stage, the fraction of animal patches (mostly labelled as an animal) and of background
    patches the DyVM backbone kept, over the first validation windows."""
    from dyvm.seg.data import EvalTransform

    size, p = args.crop_size, model.backbone.cfg.patch_size
    transform = EvalTransform(splits.base_scale)
    images, masks = zip(*(transform(*splits.val[i]) for i in range(min(num_images, len(splits.val)))))
    images = torch.stack([im[:, :size, :size] for im in images if min(im.shape[1:]) >= size])
    masks = torch.stack([m[:size, :size] for m in masks if min(m.shape) >= size])
    animal = ((masks > 0) & (masks != 255)).float().unfold(1, p, p).unfold(2, p, p).mean((-1, -2)).flatten(1) > 0.5
    decisions = model(images).backbone.decisions
    return {"animal": [round(float(d[animal].mean()), 3) for d in decisions],
            "background": [round(float(d[~animal].mean()), 3) for d in decisions], "windows": len(images)}


@torch.no_grad()
def segmentation_figure(dense, dyvm_run, path: str, num_images: int = 4) -> None:
    """dense: the dense model; dyvm_run: (args, splits, model) of the DyVM run."""
    from dyvm.seg.data import EvalTransform

    args, splits, dyvm = dyvm_run
    stride = args.slide_stride or args.crop_size * 2 // 3
    transform = EvalTransform(splits.base_scale)
    images, masks, dense_preds, dyvm_preds, kept = [], [], [], [], []
    for i in range(num_images):
        image, mask = transform(*splits.val[i])
        images.append(image)
        masks.append(mask.numpy())
        dense_preds.append(predict_with_kept_tokens(dense, image, args.crop_size, stride)[0])
        pred, keep = predict_with_kept_tokens(dyvm, image, args.crop_size, stride)
        dyvm_preds.append(pred)
        kept.append(keep)
    plot_segmentation(torch.stack(images), masks, dense_preds, dyvm_preds, kept, splits.class_names, path)


def _fmt(v, spec=".2f"):
    return "n/a" if v is None else format(v, spec)


def build_report(dense_dir: str, dyvm_dir: str, out_dir: str, wall_clock_s: float = None) -> dict:
    os.makedirs(os.path.join(out_dir, "figures"), exist_ok=True)
    dense = _read_json(os.path.join(dense_dir, "eval.json"))
    dyn = _read_json(os.path.join(dyvm_dir, "eval.json"))
    dyvm_run = _load_run(dyvm_dir)
    segmentation_figure(_load_run(dense_dir)[2], dyvm_run, os.path.join(out_dir, "figures", "segmentation.png"))
    d, y = dense["val"], dyn["val"]
    t = dyn.get("throughput", {})
    by_region = kept_by_region(*dyvm_run) if dyvm_run[1].class_names[:1] == ("background",) else None
    summary = {
        "dense": {k: d[k] for k in ("mIoU", "mAcc", "aAcc", "gmacs_backbone_paper", "gmacs_backbone_full",
                                    "gmacs_decode", "gmacs_paper", "gmacs_full")},
        "dyvm": {k: y.get(k) for k in ("mIoU", "mAcc", "aAcc", "gmacs_backbone_paper", "gmacs_backbone_full",
                                       "gmacs_decode", "gmacs_paper", "gmacs_full", "tokens_kept_per_stage",
                                       "block_keep_ratio", "block_keep_per_layer")},
        "parameters": {"dense": dense["parameters"], "dyvm": dyn["parameters"]},
        "images_per_s": t, "num_val_images": y["num_images"], "windows_per_image": y["windows_per_image"],
        "crop_size": dyn["crop_size"], "slide_stride": dyn["slide_stride"], "num_patches": dyn["num_patches"],
        "train_iters": {"dense": (read_log(dense_dir) or [{}])[-1].get("iter"),
                        "dyvm": (read_log(dyvm_dir) or [{}])[-1].get("iter")},
        "kept_by_region": by_region, "wall_clock_s": wall_clock_s}
    cut = lambda a, b: f"{100 * (1 - b / a):.1f}% fewer" if a else "n/a"  # noqa: E731
    ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "n/a"  # noqa: E731
    # (the paired speed-up where the run recorded it: the two timed in turns; else the ratio of images/s)
    speedup = lambda t, part: (f"{t['speedup_' + part]:.2f}x" if t.get("speedup_" + part)  # noqa: E731
                               else ratio(t.get(part), t.get("dense_" + part)))
    crop = dyn["crop_size"]
    lines = [
        "# DyVM segmentation demo report (embedded Animal-MNIST scenes, CPU)", "",
        f"Validation: {y['num_images']} scenes never seen in training (made of held-out silhouettes), single scale, "
        f"slide inference with {crop}x{crop} windows, stride {dyn['slide_stride']} ({y['windows_per_image']} windows "
        "per scene). MACs per window, counted from what each model ran (paper convention: one scan direction per "
        "layer; full: both directions); the neck and UPerHead cost the same in both models.", "",
        "| | dense Vim | DyVM | change |", "|---|---|---|---|",
        f"| mIoU | {d['mIoU']:.2f} | {y['mIoU']:.2f} | {y['mIoU'] - d['mIoU']:+.2f} points |",
        f"| mAcc | {d['mAcc']:.2f} | {y['mAcc']:.2f} | {y['mAcc'] - d['mAcc']:+.2f} points |",
        f"| aAcc | {d['aAcc']:.2f} | {y['aAcc']:.2f} | {y['aAcc'] - d['aAcc']:+.2f} points |",
        f"| backbone MACs, paper convention | {d['gmacs_backbone_paper'] * 1e3:.2f} M | "
        f"{y['gmacs_backbone_paper'] * 1e3:.2f} M | {cut(d['gmacs_backbone_paper'], y['gmacs_backbone_paper'])} |",
        f"| backbone MACs, full (both directions) | {d['gmacs_backbone_full'] * 1e3:.2f} M | "
        f"{y['gmacs_backbone_full'] * 1e3:.2f} M | {cut(d['gmacs_backbone_full'], y['gmacs_backbone_full'])} |",
        f"| whole model MACs (paper / full) | {d['gmacs_paper'] * 1e3:.2f} / {d['gmacs_full'] * 1e3:.2f} M | "
        f"{y['gmacs_paper'] * 1e3:.2f} / {y['gmacs_full'] * 1e3:.2f} M | {cut(d['gmacs_paper'], y['gmacs_paper'])} "
        "(paper) |",
        f"| parameters | {dense['parameters']:,} | {dyn['parameters']:,} | |",
        f"| images/s, whole model (same run, CPU) | {_fmt(t.get('dense_model'), '.1f')} | "
        f"{_fmt(t.get('model'), '.1f')} | {speedup(t, 'model')} |",
        f"| images/s, backbone only (same run, CPU) | {_fmt(t.get('dense_backbone'), '.1f')} | "
        f"{_fmt(t.get('backbone'), '.1f')} | {speedup(t, 'backbone')} |", "",
        f"Tokens kept per stage (of {dyn['num_patches']} per window, mean over windows): "
        f"{y.get('tokens_kept_per_stage')}", "",
        f"Block keep ratio realised on the validation windows: {_fmt(y.get('block_keep_ratio'), '.3f')}; per layer "
        f"[forward, backward]: {y.get('block_keep_per_layer')}", ""]
    if by_region:
        lines += [f"Patches kept after each stage, over {by_region['windows']} validation windows: animal patches "
                  f"{by_region['animal']}, background patches {by_region['background']} (a dropped patch keeps the "
                  "feature it had when dropped, so the maps stay complete). Which patches a short fine-tune keeps is "
                  "learned, not designed: see the figure.", ""]
    lines += [
        "![segmentation](figures/segmentation.png)", "",
        "Validation scenes: ground truth, the dense and the DyVM predictions, and the tokens DyVM kept after each "
        "stage (dropped ones tinted red; a pixel's shade is the fraction of the windows covering it that kept it).", ""]
    return write_report(out_dir, lines, summary, wall_clock_s)


def main(argv=None) -> int:
    p = argparse.ArgumentParser("python -m dyvm.seg.report", description="dense vs DyVM segmentation demo report")
    p.add_argument("--dense", required=True, help="output_dir of the dense run (eval.json, checkpoint.pth)")
    p.add_argument("--dyvm", required=True, help="output_dir of the DyVM run (eval.json, checkpoint.pth)")
    p.add_argument("--out", required=True)
    p.add_argument("--wall-clock-s", type=float, default=None)
    args = p.parse_args(argv)
    try:
        build_report(args.dense, args.dyvm, args.out, args.wall_clock_s)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(open(os.path.join(args.out, "report.md")).read().split("![segmentation]")[0].rstrip())
    print(f"report: {os.path.join(args.out, 'report.md')} (figure in {os.path.join(args.out, 'figures')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
