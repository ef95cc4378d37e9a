"""Figures people look at: recall by object size (paper Fig. 8), qualitative predictions (Fig. 3),
per-class changes (Fig. 7) and runs side by side. Matplotlib with the Agg backend; files written atomically."""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_figure(fig, path: str | os.PathLike, dpi: int = 120, tight: bool = True) -> Path:
    """Save and close a figure atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight" if tight else None)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


SIZE_AXES = {  # binning -> (x label, y label); see probe/metrics.py
    "quantile": ("object size (% of image pixels; quantile bins)", "macro recall"),
    "fig8": ("object size (% of image patches; equal-width bins, as paper Fig. 8)", "recall (pooled)"),
}


def plot_size_recall(series: dict[str, list[dict]], path: str | os.PathLike, title: str = "") -> Path:
    """One line per series (e.g. run name or task) of recall against object-size bin.

    Each row's `recall` is plotted (older results without it: `macro_recall`); the axes name the
    rows' `binning`, and series with different binnings are refused (their bins do not line up)."""
    binnings = {b.get("binning", "quantile") for bins in series.values() for b in bins}
    if len(binnings) > 1:
        raise ValueError(f"cannot plot object-size bins of different binnings together: {sorted(binnings)}")
    xlabel, ylabel = SIZE_AXES[binnings.pop() if binnings else "quantile"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = None
    for name, bins in series.items():
        if not bins:
            continue
        y = [b.get("recall", b["macro_recall"]) for b in bins]
        ax.plot(range(1, len(bins) + 1), [math.nan if v is None else v for v in y], marker="o", label=name)
        labels = [f"{100 * b['size_lo']:.2g}-{100 * b['size_hi']:.2g}%" for b in bins]
    if labels:
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=45, ha="right", fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "recall by object size")
    return save_figure(fig, path)


def plot_qualitative(images: Sequence[np.ndarray], truth: Sequence[np.ndarray], pred: Sequence[np.ndarray],
                     classes: Sequence[Sequence[int]], class_names: Sequence[str], path: str | os.PathLike,
                     title: str = "") -> Path:
    """Rows = images; columns = image | (ground-truth patches, predicted patches) per shown class.

    images: (S, S, 3) uint8; truth/pred: (P, P, C) bool patch labels; classes: class ids per row.
    """
    ncls = max((len(c) for c in classes), default=0)
    rows, cols = len(images), 1 + 2 * ncls
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 1.9 * rows), squeeze=False)
    for r, (img, t, p, cs) in enumerate(zip(images, truth, pred, classes)):
        S, P = img.shape[0], t.shape[0]
        edge = P * (S // P) - 0.5  # the patch grid covers the trimmed image (pixel centres at integers)
        extent = (-0.5, edge, edge, -0.5)
        axes[r, 0].imshow(img)
        axes[r, 0].set_title("image", fontsize=8)
        for k in range(ncls):
            for j, (m, what, color) in enumerate(((t, "true", (1, 0.2, 0.2)), (p, "pred", (0.2, 0.5, 1)))):
                ax = axes[r, 1 + 2 * k + j]
                ax.imshow(img)
                if k < len(cs):
                    overlay = np.zeros((P, P, 4))
                    overlay[..., :3] = color
                    overlay[..., 3] = 0.6 * m[:, :, cs[k]]
                    ax.imshow(overlay, extent=extent, interpolation="nearest")
                    ax.set_xlim(-0.5, S - 0.5), ax.set_ylim(S - 0.5, -0.5)
                    ax.set_title(f"{class_names[cs[k]]} ({what})", fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([]), ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def plot_compare(names: Sequence[str], local: Sequence[float | None], global_: Sequence[float | None],
                 path: str | os.PathLike, title: str = "") -> Path:
    """Grouped bars: local and global macro recall per run."""
    x = np.arange(len(names))
    w = 0.38
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(names) + 1.5), 3.6))
    for off, vals, lab in ((-w / 2, local, "local"), (w / 2, global_, "global")):
        v = [math.nan if a is None else 100 * a for a in vals]
        bars = ax.bar(x + off, v, w, label=lab)
        for b, val in zip(bars, v):
            if not math.isnan(val):
                ax.annotate(f"{val:.1f}", (b.get_x() + b.get_width() / 2, val), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("macro recall (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title(title or "probing: local and global macro recall")
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def plot_class_deltas(deltas: Sequence[dict], kinds: dict[str, range], path: str | os.PathLike,
                      title: str = "", top: int = 10) -> Path:
    """Paper Fig. 7: every class's recall change, sorted (top), and the `top` most improved
    classes of each kind (bottom; COCO-Stuff: things and stuff)."""
    kind_of = {c: k for k, ids in kinds.items() for c in ids}
    colours = {k: f"C{i}" for i, k in enumerate(kinds)}
    rows = sorted(deltas, key=lambda r: -r["delta"])
    fig = plt.figure(figsize=(max(7.0, 3.2 * len(kinds)), 6.2))
    grid = fig.add_gridspec(2, len(kinds), height_ratios=(1, 1.1))
    ax = fig.add_subplot(grid[0, :])
    ax.bar(range(len(rows)), [100 * r["delta"] for r in rows], width=1.0,
           color=[colours.get(kind_of.get(r["class_id"]), "grey") for r in rows])
    if len(rows) <= 30:  # names fit only for small label sets
        ax.set_xticks(range(len(rows)), [r["class"] for r in rows], rotation=60, ha="right", fontsize=7)
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"{len(rows)} classes, sorted")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel("Δ recall (points)")
    if len(kinds) > 1:
        ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()], labels=list(colours),
                  fontsize=8)
    ax.set_title(title or "local recall change by class")
    for i, (kind, ids) in enumerate(kinds.items()):
        sub = fig.add_subplot(grid[1, i])
        best = [r for r in rows if r["class_id"] in ids][:top][::-1]  # largest at the top
        sub.barh(range(len(best)), [100 * r["delta"] for r in best], color=colours[kind])
        sub.set_yticks(range(len(best)), [r["class"] for r in best], fontsize=7)
        sub.axvline(0, color="black", lw=0.6)
        sub.set_xlabel("Δ recall (points)", fontsize=8)
        sub.set_title(f"most improved {kind}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
