"""Figures: the tokens DyVM keeps at each stage drawn over the images, training curves, accuracy vs FLOPs."""
from typing import Dict, List, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from dyvm.data import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402



def _finish(fig: plt.Figure, path: str) -> plt.Figure:
    """Lay out; when a path is given, save there and release the figure (long runs draw many)."""
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig

def denormalize(images: Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """(N, C, H, W) normalised -> (N, H, W, C) floats in [0, 1] for display."""
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images.cpu() * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def kept_token_overlay(image: np.ndarray, keep: Tensor, grid: int) -> np.ndarray:
    """Darken and tint the patches a stage dropped; keep: (grid*grid,) 0/1 in the original patch order."""
    h, w = image.shape[:2]
    ph, pw = h // grid, w // grid
    mask = keep.detach().float().cpu().view(grid, grid).numpy()
    mask = np.kron(mask, np.ones((ph, pw)))[..., None]
    dropped_tint = np.array([0.55, 0.1, 0.1])
    return image * mask + (0.25 * image + dropped_tint * 0.75) * (1 - mask)


def plot_kept_tokens(images: Tensor, decisions: Sequence[Tensor], grid: int, titles: Sequence[str] = (),
                     path: str = "") -> plt.Figure:
    """Rows = images; columns = the input and the tokens left after each pruning stage (dropped ones tinted red).
    images: (N, C, H, W) normalised; decisions: per stage (N, grid*grid) 0/1 over the original patch order."""
    pics = denormalize(images)
    n, stages = len(pics), len(decisions)
    fig, axes = plt.subplots(n, stages + 1, figsize=(1.6 * (stages + 1), 1.6 * n), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(pics[i], interpolation="nearest")
        axes[i, 0].set_ylabel(titles[i] if i < len(titles) else "", fontsize=7)
        for s in range(stages):
            kept = int(decisions[s][i].sum())
            axes[i, s + 1].imshow(kept_token_overlay(pics[i], decisions[s][i], grid), interpolation="nearest")
            axes[i, s + 1].set_xlabel(f"{kept}/{grid * grid} kept", fontsize=7)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title("input", fontsize=8)
    for s in range(stages):
        axes[0, s + 1].set_title(f"after stage {s + 1}", fontsize=8)
    return _finish(fig, path)


def plot_training_curves(logs: Dict[str, List[dict]], path: str = "") -> plt.Figure:
    """logs: run name -> log.txt lines (dicts). Left: training loss; right: validation top-1 (raw and EMA)."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, rows in logs.items():
        epochs = [r["epoch"] + 1 for r in rows]
        ax_loss.plot(epochs, [r["train_loss"] for r in rows], marker="o", label=f"{name} total")
        if rows and "train_cls_loss" in rows[0] and any(k.startswith("train_cls_kl") for k in rows[0]):
            ax_loss.plot(epochs, [r["train_cls_loss"] for r in rows], marker=".", ls="--", label=f"{name} cls")
        ax_acc.plot(epochs, [r["test_acc1"] for r in rows], marker="o", label=f"{name} raw")
        if rows and "ema_test_acc1" in rows[0]:
            ax_acc.plot(epochs, [r["ema_test_acc1"] for r in rows], marker=".", ls="--", label=f"{name} EMA")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="validation top-1")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _finish(fig, path)


def plot_accuracy_vs_flops(points: Dict[str, tuple], path: str = "") -> plt.Figure:
    """points: name -> (GMACs paper convention, top-1)."""
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    for name, (gmacs, acc) in points.items():
        ax.scatter([gmacs], [acc])
        ax.annotate(name, (gmacs, acc), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel="MACs per image (G, paper convention)", ylabel="top-1 (%)", title="accuracy vs FLOPs")
    ax.grid(alpha=0.3)
    return _finish(fig, path)
