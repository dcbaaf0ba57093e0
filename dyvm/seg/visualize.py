"""Figure of the segmentation demo: scenes, ground truth, dense and DyVM predictions, and the tokens DyVM kept.

Kept tokens are drawn per pixel as the fraction of the sliding windows covering it whose backbone kept the
token there after each pruning stage (windows whose offsets are multiples of the patch size line up on one grid;
otherwise the fraction is still per pixel); dropped areas are tinted red as in dyvm.visualize.
"""
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from dyvm.seg.heads import resize  # noqa: E402
from dyvm.seg.segmentor import Segmentor, slide_inference, window_starts  # noqa: E402
from dyvm.visualize import denormalize  # noqa: E402

_PALETTE = np.array([[0.12, 0.12, 0.12], [0.90, 0.10, 0.29], [0.24, 0.71, 0.29], [1.0, 0.88, 0.10],
                     [0.0, 0.51, 0.78], [0.96, 0.51, 0.19], [0.57, 0.12, 0.71], [0.27, 0.94, 0.94],
                     [0.94, 0.20, 0.90], [0.82, 0.96, 0.24], [0.98, 0.75, 0.83]])


def palette(num_classes: int) -> np.ndarray:
    if num_classes <= len(_PALETTE):
        return _PALETTE[:num_classes]
    return plt.get_cmap("tab20", num_classes)(np.arange(num_classes))[:, :3]


def colorize(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) class indices (255 = ignore, drawn white) -> (H, W, 3) colours."""
    colours = np.vstack([palette(num_classes), np.ones((256 - num_classes, 3))])
    return colours[np.asarray(mask).astype(np.int64)]


@torch.no_grad()
def predict_with_kept_tokens(model: Segmentor, image: torch.Tensor, crop: int, stride: int):
    """One normalised image (3, H, W) -> (prediction (H, W), per stage the kept fraction per pixel (H, W))."""
    model.eval()
    b = model.backbone
    _, h, w = image.shape
    offsets = [(y, x) for y in window_starts(h, crop, stride) for x in window_starts(w, crop, stride)]
    stages = b.dyvm_cfg.num_stages
    kept, cover, seen = np.zeros((stages, h, w)), np.zeros((h, w)), []
    g, p = b.cfg.grid_size, b.cfg.patch_size

    def on_window(out):
        y, x = offsets[len(seen)]
        seen.append(1)
        ch, cw = min(crop, h - y), min(crop, w - x)
        cover[y:y + ch, x:x + cw] += 1
        for s, d in enumerate(out.backbone.decisions):
            grid = d[0].float().view(g, g).cpu().numpy()
            kept[s, y:y + ch, x:x + cw] += np.kron(grid, np.ones((p, p)))[:ch, :cw]

    logits = slide_inference(model, image[None], crop, stride, on_window)
    pred = resize(logits, (h, w)).argmax(1)[0].cpu().numpy()
    return pred, [k / np.maximum(cover, 1) for k in kept]


def plot_segmentation(images: torch.Tensor, masks: Sequence[np.ndarray], dense_preds: Sequence[np.ndarray],
                      dyvm_preds: Sequence[np.ndarray], kept: Sequence[Sequence[np.ndarray]],
                      class_names: Sequence[str], path: str = "", titles: Sequence[str] = ()):
    """Rows = scenes; columns = input, ground truth, dense prediction, DyVM prediction, DyVM kept tokens after
    each stage. kept[i][s]: (H, W) fraction of windows that kept the pixel's token after stage s."""
    pics = denormalize(images)
    n, stages, k = len(pics), len(kept[0]) if kept else 0, len(class_names)
    cols = 4 + stages
    fig, axes = plt.subplots(n, cols, figsize=(1.55 * cols, 1.6 * n + 0.6), squeeze=False)
    tint = np.array([0.55, 0.1, 0.1])
    for i in range(n):
        panels = [pics[i], colorize(masks[i], k), colorize(dense_preds[i], k), colorize(dyvm_preds[i], k)]
        for s in range(stages):
            f = kept[i][s][..., None]
            panels.append(pics[i] * f + (0.25 * pics[i] + 0.75 * tint) * (1 - f))
        for j, panel in enumerate(panels):
            axes[i, j].imshow(panel, interpolation="nearest")
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
        if i < len(titles):
            axes[i, 0].set_ylabel(titles[i], fontsize=7)
        for s in range(stages):
            axes[i, 4 + s].set_xlabel(f"{100 * kept[i][s].mean():.0f}% kept", fontsize=7)
    heads = ["input", "ground truth", "dense", "DyVM"] + [f"kept, stage {s + 1}" for s in range(stages)]
    for j, name in enumerate(heads):
        axes[0, j].set_title(name, fontsize=8)
    fig.legend(handles=[Patch(color=c, label=name) for c, name in zip(palette(k), class_names)],
               loc="lower center", ncol=min(k, 6), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06 if n > 2 else 0.12, 1, 1))
    return _finish_saved(fig, path)


def _finish_saved(fig, path: str):
    if path:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig
