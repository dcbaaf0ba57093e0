"""Segmentation metrics from a confusion matrix (mmseg's definitions).

confusion[t, p] counts the labelled pixels of true class t predicted as p (label 255 = ignored).
  IoU_c = confusion[c, c] / (row_c + column_c - confusion[c, c])   over classes whose union is non-empty
  Acc_c = confusion[c, c] / row_c                                   over classes present in the ground truth
  mIoU, mAcc = the means over those classes; aAcc = trace / total (every labelled pixel alike).
Reported in percent. Distributed evaluation sums the per-rank matrices.
"""
import math

import torch
from torch import Tensor

IGNORE_INDEX = 255


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """pred, target (...) integer maps -> (num_classes, num_classes) int64 counts over the labelled pixels."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(target.shape)} shapes differ")
    valid = target != ignore_index
    t, p = target[valid].long(), pred[valid].long()
    if t.numel() and (int(t.max()) >= num_classes or int(t.min()) < 0):
        raise ValueError(f"label values must be in [0, {num_classes}) or {ignore_index}; found "
                         f"{sorted(set(t.unique().tolist()) - set(range(num_classes)))[:5]}")
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def _mean(values: Tensor) -> float:
    """Mean over the non-NaN entries (NaN when there are none)."""
    finite = values[~torch.isnan(values)]
    return float(finite.mean()) if finite.numel() else math.nan


def segmentation_metrics(confusion: Tensor) -> dict:
    """-> {'mIoU', 'mAcc', 'aAcc' (percent), 'IoU', 'Acc' (per class, percent, NaN where undefined)}."""
    c = confusion.double()
    tp = c.diag()
    gt, predicted = c.sum(1), c.sum(0)
    union = gt + predicted - tp
    nan = torch.tensor(math.nan, dtype=torch.float64)
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan) * 100
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan) * 100
    total = float(c.sum())
    return {"mIoU": _mean(iou), "mAcc": _mean(acc), "aAcc": 100 * float(tp.sum()) / total if total else math.nan,
            "IoU": [round(v, 2) if not math.isnan(v) else None for v in iou.tolist()],
            "Acc": [round(v, 2) if not math.isnan(v) else None for v in acc.tolist()]}
