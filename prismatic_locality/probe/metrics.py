"""The probing metric (paper App. B; docs/probe.md): macro recall at logit > 0 (sigmoid > 0.5), best epoch on val.

Per class, a 2x2 confusion matrix is accumulated over all val patches of all images (local) or over
all images (global). Recall = TP / (TP + FN); the macro average is over the classes with at least
one positive in val (never-used COCO ids and absent classes drop out; class 0 counts when present).
The reported number is the best per-epoch macro recall.

Recall by object size (paper Fig. 8), two binnings (`SIZE_BINNINGS`):

- `quantile` (default), `size_stratified_recall`: an *object* is an (image, class) pair with
  class != 0 and at least one positive target; its size is the fraction of the (cropped, resized,
  trimmed) image's pixels that belong to the class. Bins are size quantiles over the val objects,
  so every bin holds ~10% of them; macro recall per bin.
- `fig8`, `fig8_size_recall`: the paper's binning, for numbers that compare with its Fig. 8. The
  size of an (image, class) pair is the fraction of the image's *patches* where the class is
  positive; bins are equal-width on [0, 1] (a fraction on an edge goes to the lower bin); class 0
  counts; recall is pooled over all positive (patch, class) targets in the bin.

Either way the bins depend on the dataset only (the same for every backbone being compared).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

SIZE_BINNINGS = ("quantile", "fig8")


class Confusion:
    """Per-class TP/FP/FN/TN counts for multi-label predictions (..., C)."""

    def __init__(self, num_classes: int):
        self.tp, self.fp, self.fn, self.tn = (torch.zeros(num_classes, dtype=torch.long) for _ in range(4))

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = pred.bool().reshape(-1, pred.shape[-1]), target.bool().reshape(-1, target.shape[-1])
        self.tp += (pred & target).sum(0).cpu()
        self.fp += (pred & ~target).sum(0).cpu()
        self.fn += (~pred & target).sum(0).cpu()
        self.tn += (~pred & ~target).sum(0).cpu()

    @property
    def positives(self) -> torch.Tensor:
        return self.tp + self.fn

    def recall(self) -> list[float | None]:
        """Per-class recall; None where the class has no positives."""
        pos = self.positives
        return [tp / p if p > 0 else None for tp, p in zip(self.tp.tolist(), pos.tolist())]

    def summary(self) -> dict:
        pos = self.positives
        has = pos > 0
        if not bool(has.any()):
            raise ValueError("no class has a positive in the val set: macro recall is undefined")
        tp, fp, fn, tn = (t.double() for t in (self.tp, self.fp, self.fn, self.tn))
        recall = tp / pos.clamp(min=1)
        precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), torch.zeros_like(tp))
        f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                         torch.zeros_like(tp))
        return {
            "macro_recall": float(recall[has].mean()),
            "macro_precision": float(precision[has].mean()),
            "macro_f1": float(f1[has].mean()),
            "micro_accuracy": float((tp + tn).sum() / (tp + fp + fn + tn).sum()),
            "num_classes_evaluated": int(has.sum()),
        }


def macro_recall(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Convenience: macro recall of one set of predictions."""
    c = Confusion(pred.shape[-1])
    c.update(pred, target)
    return c.summary()["macro_recall"]


def best_epoch(history: Sequence[float]) -> int:
    """Index of the best epoch (the first one on ties)."""
    if not history:
        raise ValueError("no epochs evaluated")
    return max(range(len(history)), key=lambda e: (history[e], -e))


def size_stratified_recall(fractions: np.ndarray, positives: np.ndarray, true_pos: np.ndarray,
                           num_bins: int = 10) -> list[dict]:
    """Recall within object-size bins.

    fractions, positives, true_pos: (N, C) per (image, class): pixel fraction, number of positive
    targets (patches), number of those predicted positive. Returns one dict per bin with its size
    range, object count, macro recall (over classes with objects in the bin) and micro recall
    (pooled over the bin's positive targets).
    """
    fractions, positives, true_pos = (np.asarray(a, dtype=np.float64) for a in (fractions, positives, true_pos))
    obj = (positives > 0) & (fractions > 0)
    obj[:, 0] = False  # unlabeled/other/background is not an object
    img, cls = np.nonzero(obj)
    if img.size == 0:
        return []
    size = fractions[img, cls]
    edges = np.quantile(size, np.linspace(0, 1, num_bins + 1))
    which = np.clip(np.searchsorted(edges, size, side="right") - 1, 0, num_bins - 1)
    out = []
    for b in range(num_bins):
        sel = which == b
        row = {"bin": b, "size_lo": float(edges[b]), "size_hi": float(edges[b + 1]), "objects": int(sel.sum()),
               "positives": 0, "macro_recall": math.nan, "micro_recall": math.nan}
        if sel.any():
            p, t, c = positives[img[sel], cls[sel]], true_pos[img[sel], cls[sel]], cls[sel]
            per_class_pos = np.bincount(c, weights=p, minlength=fractions.shape[1])
            per_class_tp = np.bincount(c, weights=t, minlength=fractions.shape[1])
            has = per_class_pos > 0
            row["macro_recall"] = float((per_class_tp[has] / per_class_pos[has]).mean())
            row["micro_recall"] = float(t.sum() / p.sum())
            row["positives"] = int(p.sum())
        out.append(row)
    return out


def fig8_size_recall(positives: np.ndarray, true_pos: np.ndarray, num_patches: int, num_bins: int = 10) -> list[dict]:
    """Recall within equal-width bins of patch fraction (paper Fig. 8).

    positives, true_pos: (N, C) per (image, class): positive patches and those predicted positive.
    A pair with k of `num_patches` patches positive falls in bin b with b/B < k/n <= (b+1)/B
    (integer arithmetic, so edges are exact). Returns one dict per bin: its range, the number of
    (image, class) pairs, their positive patches, and the pooled recall (also `micro_recall`;
    `macro_recall` = mean over the bin's classes, for reference).
    """
    pos, tp = (np.asarray(a, dtype=np.int64) for a in (positives, true_pos))
    which = np.maximum(-(-pos * num_bins // num_patches) - 1, 0)  # ceil(k B / n) - 1
    cls = np.broadcast_to(np.arange(pos.shape[1]), pos.shape)
    out = []
    for b in range(num_bins):
        sel = (which == b) & (pos > 0)
        p, t = pos[sel], tp[sel]
        row = {"bin": b, "size_lo": b / num_bins, "size_hi": (b + 1) / num_bins, "objects": int(sel.sum()),
               "positives": int(p.sum()), "recall": math.nan, "macro_recall": math.nan, "micro_recall": math.nan,
               "binning": "fig8"}
        if sel.any():
            row["recall"] = row["micro_recall"] = float(t.sum() / p.sum())
            per_class_pos = np.bincount(cls[sel], weights=p, minlength=pos.shape[1])
            per_class_tp = np.bincount(cls[sel], weights=t, minlength=pos.shape[1])
            has = per_class_pos > 0
            row["macro_recall"] = float((per_class_tp[has] / per_class_pos[has]).mean())
        out.append(row)
    return out


def size_recall(binning: str, fractions: np.ndarray, positives: np.ndarray, true_pos: np.ndarray,
                num_patches: int, num_bins: int = 10) -> list[dict]:
    """Recall by object size with `binning` (`SIZE_BINNINGS`); every row's `recall` is its headline number."""
    if binning == "fig8":
        return fig8_size_recall(positives, true_pos, num_patches, num_bins)
    if binning == "quantile":
        return [{**row, "recall": row["macro_recall"], "binning": "quantile"}
                for row in size_stratified_recall(fractions, positives, true_pos, num_bins)]
    raise ValueError(f"size_binning must be one of {' | '.join(SIZE_BINNINGS)}, got {binning!r}")
