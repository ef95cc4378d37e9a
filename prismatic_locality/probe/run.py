"""`locality probe`: train probing heads on frozen features, report local and global macro recall.

    locality probe --backbone vit_base_patch16_224.augreg_in1k --dataset coco-stuff --data.root /data/coco
    locality probe --backbone runs/align/clip-b16 --dataset ade20k --data.root /data/ade

Python API (what the demo calls):

    from prismatic_locality.probe.run import ProbeConfig, run_probe
    from prismatic_locality.probe.backbone import Backbone
    results = run_probe(cfg)                                   # loads cfg.backbone
    results = run_probe(cfg, backbone=Backbone(model, "timm", "teacher"))   # an in-memory model

Features are cached under `cache_dir` (features.py), so repeated calls with the same backbone
weights and data reuse them. Outputs in `output_dir`: results.json, per_class.{csv,md},
size_recall.{csv,png}, qualitative.png.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import draccus
import numpy as np
import torch

from .. import precision as P
from ..align.config import check_finite, check_range
from ..fileio import check_output_dir, write_json, write_text
from . import plots
from .backbone import Backbone, BackboneConfig, load_backbone
from .datasets import DATASETS, ProbeDataset
from .features import ProbeSplit, build_split, default_cache_dir
from .heads import HEADS, check_view
from .labels import unpack
from .metrics import SIZE_BINNINGS, size_recall
from .train import HeadConfig, ProbeOptimConfig, fit_probe, predict

log = logging.getLogger(__name__)


@dataclass
class ProbeDataConfig:
    root: str = ""                     # dataset root (layouts in datasets.py / docs/probe.md)
    train_limit: Optional[int] = None  # use only the first N train pairs (sorted by name)
    val_limit: Optional[int] = None
    skip_unpaired: bool = False        # skip (count, log) images without labels and vice versa instead of failing
    num_workers: int = 2               # decoding workers for the one-off feature extraction


@dataclass
class ProbeConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    dataset: str = "coco-stuff"        # coco-stuff | ade20k | demo
    data: ProbeDataConfig = field(default_factory=ProbeDataConfig)
    task: str = "both"                 # local | global | both
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: ProbeOptimConfig = field(default_factory=ProbeOptimConfig)
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda[:i]
    threads: Optional[int] = None      # torch CPU threads for this run (1 is much faster on an oversubscribed CPU)
    cache_dir: Optional[str] = None    # default: $XDG_CACHE_HOME/prismatic-locality/probe
    output_dir: Optional[str] = None   # default: runs/probe/<backbone>-<dataset>
    extract_batch_size: int = 64
    extract_precision: str = "auto"    # precision.py: auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    size_bins: int = 10
    size_binning: str = "quantile"     # recall by object size: quantile (pixel-fraction quantiles, macro) | fig8 (the paper's)
    figure_images: int = 4             # qualitative figure: rows (val images)
    figure_classes: int = 2            # ... and classes shown per image
    write_outputs: bool = True         # False: only return the results (no files)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_output_dir(cfg: ProbeConfig, backbone_name: str) -> Path:
    short = Path(backbone_name.rstrip("/")).name if os.path.exists(backbone_name) else backbone_name
    return Path("runs") / "probe" / re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{short}-{cfg.dataset}")


def _jsonable(x):
    """NaN -> None (strict JSON), numpy scalars -> Python."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def summary_line(results: dict) -> str:
    parts = []
    for task in ("local", "global"):
        r = results.get(task)
        if r:
            parts.append(f"{task} {100 * r['macro_recall']:.2f}% (epoch {r['best_epoch']}/{len(r['epochs'])})")
    d = results["dataset"]
    return (f"probe {results['backbone']['name']} on {d['name']} ({d['num_train']} train / {d['num_val']} val, "
            f"{_head_name(results['config']['head'])}): macro recall " + ", ".join(parts))


def _head_name(head: dict) -> str:
    view = head.get("view", "full")
    return f"{head['kind']} head" + ("" if view == "full" else f", {view} view")


def run_probe(cfg: ProbeConfig, backbone: Optional[Backbone] = None) -> dict:
    """Probe a backbone (loaded from `cfg.backbone` unless given); returns the results dict."""
    if cfg.threads is None:
        return _run_probe(cfg, backbone)
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run_probe(cfg, backbone)
    finally:
        torch.set_num_threads(before)


def validate(cfg: ProbeConfig) -> ProbeConfig:
    """Fail before any extraction, one line naming the field."""
    if cfg.task not in ("local", "global", "both"):
        raise ValueError(f"task must be local | global | both, got {cfg.task!r}")
    if cfg.dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {cfg.dataset!r}")
    if not cfg.data.root:
        raise ValueError("data.root is required (--data.root DIR)")
    if cfg.head.kind not in HEADS:
        raise ValueError(f"config field 'head.kind' must be one of {' | '.join(HEADS)}, got {cfg.head.kind!r}")
    check_finite(cfg)
    o, h, d = cfg.optim, cfg.head, cfg.data
    positive = {"optim.lr": o.lr, "optim.batch_size": o.batch_size, "optim.epochs": o.epochs,
                "optim.eval_batch_size": o.eval_batch_size, "head.depth": h.depth, "head.hidden": h.hidden,
                "data.train_limit": d.train_limit, "data.val_limit": d.val_limit, "threads": cfg.threads,
                "extract_batch_size": cfg.extract_batch_size, "size_bins": cfg.size_bins,
                "figure_classes": cfg.figure_classes}
    for name, v in positive.items():
        check_range(name, v, 0, lo_open=True)
    non_negative = {"optim.min_lr": o.min_lr, "optim.weight_decay": o.weight_decay, "optim.warmup_steps": o.warmup_steps,
                    "optim.max_ram_gb": o.max_ram_gb, "head.layer_scale": h.layer_scale,
                    "data.num_workers": d.num_workers, "figure_images": cfg.figure_images}
    for name, v in non_negative.items():
        check_range(name, v, 0)
    if cfg.size_binning not in SIZE_BINNINGS:
        raise ValueError(f"size_binning must be one of {' | '.join(SIZE_BINNINGS)}, got {cfg.size_binning!r}")
    for task in ("local", "global") if cfg.task == "both" else (cfg.task,):  # before any extraction
        check_view(cfg.head.view, cfg.head.kind, task)
    return cfg


def _run_probe(cfg: ProbeConfig, backbone: Optional[Backbone]) -> dict:
    validate(cfg)
    tasks = ("local", "global") if cfg.task == "both" else (cfg.task,)
    out = None
    if cfg.write_outputs:  # where the results go and where the cache grows: writable, before any compute
        out = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg, backbone.name if backbone else cfg.backbone.name)
        check_output_dir(out, "output_dir")
    check_output_dir(cfg.cache_dir or default_cache_dir(), "cache_dir")
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    for value, name in ((cfg.extract_precision, "extract_precision"), (cfg.optim.precision, "optim.precision")):
        P.resolve(value, device, name)  # a bad value fails before any extraction
    if backbone is None:
        backbone = load_backbone(cfg.backbone, device)
    spec = backbone.spec
    splits: dict[str, ProbeSplit] = {}
    for split, limit in (("train", cfg.data.train_limit), ("val", cfg.data.val_limit)):
        ds = ProbeDataset(cfg.dataset, cfg.data.root, split, spec.img_size, spec.patch_size, limit=limit,
                          skip_unpaired=cfg.data.skip_unpaired)
        splits[split] = build_split(ds, backbone, cfg.cache_dir, batch_size=cfg.extract_batch_size,
                                    num_workers=cfg.data.num_workers, device=device,
                                    precision=cfg.extract_precision, desc=f"{backbone.name} {split}")
    train, val = splits["train"], splits["val"]
    extract_s = time.perf_counter() - start
    class_names = list(val.dataset.class_names)

    results: dict = {
        "backbone": backbone.describe(),
        "dataset": {"name": cfg.dataset, "root": str(cfg.data.root), "num_train": len(train), "num_val": len(val),
                    "num_classes": val.num_classes, "class_names": class_names},
        "config": asdict(cfg),
        "cache": {"train": str(train.features_dir), "val": str(val.features_dir),
                  "reused": bool(train.features_cached and val.features_cached)},
    }
    heads = {}
    for task in tasks:
        r, head = fit_probe(train, val, task, spec.num_heads, cfg.head, cfg.optim, cfg.seed, device,
                            desc=f"{backbone.name} ")
        pos, tp = r.pop("_per_image")
        # Fig. 8 bins patch fractions of the local targets: defined for local probing only
        binned = task == "local" or cfg.size_binning == "quantile"
        r["size_binning"] = cfg.size_binning
        r["size_bins"] = size_recall(cfg.size_binning, np.asarray(val.fractions), pos, tp, val.patch.shape[1],
                                     cfg.size_bins) if binned else []
        results[task], heads[task] = r, head
    results["timing"] = {"extract_s": round(extract_s, 3), "total_s": round(time.perf_counter() - start, 3)}
    results = _jsonable(results)
    results["summary"] = summary_line(results)

    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        results["output_dir"] = str(out)
        write_outputs(out, results, val, heads, cfg, device)
    print(results["summary"], flush=True)
    return results


def per_class_rows(results: dict) -> list[dict]:
    names = results["dataset"]["class_names"]
    rows = []
    for c, name in enumerate(names):
        row = {"class_id": c, "class": name}
        for task in ("local", "global"):
            if task in results:
                row[f"{task}_recall"] = results[task]["per_class_recall"][c]
                row[f"{task}_positives"] = results[task]["val_positives"][c]
        rows.append(row)
    return rows


def write_outputs(out: Path, results: dict, val: ProbeSplit, heads: dict, cfg: ProbeConfig,
                  device: torch.device) -> None:
    write_json(out / "results.json", results)
    rows = per_class_rows(results)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_text(out / "per_class.csv", buf.getvalue())

    tasks = [t for t in ("local", "global") if t in results]
    fmt = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
    md = [f"# {results['summary']}", "", "| id | class | " + " | ".join(f"{t} recall (%) | {t} val positives" for t in tasks) + " |",
          "|---|---|" + "---|---|" * len(tasks)]
    for r in rows:
        if any(r.get(f"{t}_positives", 0) for t in tasks):
            md.append(f"| {r['class_id']} | {r['class']} | " +
                      " | ".join(f"{fmt(r[f'{t}_recall'])} | {r[f'{t}_positives']}" for t in tasks) + " |")
    write_text(out / "per_class.md", "\n".join(md) + "\n")

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["task", "binning", "bin", "size_lo", "size_hi", "objects", "positives", "recall", "macro_recall",
                "micro_recall"])
    for t in tasks:
        for b in results[t]["size_bins"]:
            w.writerow([t, b["binning"], b["bin"], b["size_lo"], b["size_hi"], b["objects"], b["positives"], b["recall"],
                        b["macro_recall"], b["micro_recall"]])
    write_text(out / "size_recall.csv", buf.getvalue())
    plots.plot_size_recall({t: results[t]["size_bins"] for t in tasks}, out / "size_recall.png",
                           title=f"{results['backbone']['name']}: recall by object size")
    if "local" in heads and cfg.figure_images > 0:
        qualitative_figure(out / "qualitative.png", val, heads["local"], cfg, device, results["backbone"]["name"])


def qualitative_figure(path: Path, val: ProbeSplit, head: torch.nn.Module, cfg: ProbeConfig,
                       device: torch.device, title: str) -> Optional[Path]:
    """Paper Fig. 3: the first val images with a non-background class; their largest classes."""
    fr = np.asarray(val.fractions)
    chosen = [i for i in range(len(val)) if (fr[i, 1:] > 0).any()][: cfg.figure_images]
    if not chosen:
        log.warning("qualitative figure skipped: no val image contains a non-background class")
        return None
    P = int(round(math.sqrt(val.patch.shape[1])))
    x = torch.from_numpy(np.asarray(val.features[chosen])).to(device).float()
    head.eval()
    pred = predict(head, x).cpu().reshape(len(chosen), P, P, -1).numpy()
    truth = unpack(torch.from_numpy(np.asarray(val.patch[chosen])), val.num_classes).reshape(len(chosen), P, P, -1).numpy()
    classes = [[int(c) + 1 for c in np.argsort(-fr[i, 1:], kind="stable")[: cfg.figure_classes] if fr[i, c + 1] > 0]
               for i in chosen]
    images = [np.asarray(val.dataset.load_image(i)) for i in chosen]
    return plots.plot_qualitative(images, truth, pred, classes, val.dataset.class_names, path, title=title)


def _backbone_shorthand(argv: list[str]) -> list[str]:
    """`--backbone NAME` / `--backbone=NAME` is shorthand for `--backbone.name NAME`."""
    out = []
    for a in argv:
        if a == "--backbone":
            out.append("--backbone.name")
        elif a.startswith("--backbone="):
            out.append("--backbone.name=" + a.split("=", 1)[1])
        else:
            out.append(a)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = draccus.parse(ProbeConfig, args=_backbone_shorthand(list(argv)), prog="locality probe",
                            exit_on_error=False)
        results = run_probe(cfg)
    except draccus.utils.DraccusException as e:  # a bad argument or value: draccus's message names it
        print(f"locality probe: error: {' '.join(str(e).split())} (see --help)", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        # errors raised in DataLoader workers arrive wrapped with a traceback: keep the last line
        msg = [ln for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
        print(f"locality probe: error: {msg[-1]}", file=sys.stderr)
        return 2
    print(f"wrote {results['output_dir']}/results.json" if "output_dir" in results else "", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
