"""`locality vlm-compare <results dir>`: put vlm-evaluation results side by side.

Reads the harness's own output tree, ``<results>/<dataset_family>/<dataset_id>/<model_id>/metrics.json``
(written by vlm-evaluation's ``scripts/score.py``), and writes, for the models found:

- a markdown table (models x benchmarks, in percent),
- per-benchmark deltas against ``--baseline`` (percentage points),
- per-benchmark z-scores over the pool of models, and the paper's radar chart of them (App. D:
  "axes scaled separately for each benchmark based on the mean and standard deviation of
  performance within our pool of models"),
- the same numbers as JSON.

A benchmark without a scored, complete ``metrics.json`` is *missing*: it prints as "—", is never
treated as zero and takes no part in the z-score statistics. A ``metrics.json`` that is not in the
harness's layout is an error naming the file. Only the full splits are read (the paper reports
full splits; a slim result is not comparable with a full one).

This module reads JSON only; it imports neither ``prismatic`` nor ``vlm_eval``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prismatic_locality.fileio import write_json, write_text

MISSING = "—"


@dataclass(frozen=True)
class Benchmark:
    name: str           # column / radar-axis label
    family: str         # vlm-eval dataset_family (first directory level)
    dataset_id: str     # vlm-eval dataset_id (second directory level)
    key: str            # entry of metrics.json["summary"]
    scale: float        # to percent: the VQA-style scorers already report 0-100, the others 0-1
    group: str          # "spatial" | "holistic" (paper Fig. 5's split; only used for ordering/labels)
    expected: int       # DatasetConfig.expected_examples of the full split (partial-result check)


# The axes of the paper's radar charts, one metric each. Keys and scales are those written by
# vlm-evaluation's scorers (vlm_eval/tasks/harnesses/*.py); expected counts are its full splits.
BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("RefCOCO", "refcoco", "refcoco-full", "accuracy__RefCOCO", 100, "spatial", 26488),
    Benchmark("RefCOCO+", "refcoco", "refcoco-full", "accuracy__RefCOCO+", 100, "spatial", 26488),
    Benchmark("RefCOCOg", "refcoco", "refcoco-full", "accuracy__RefCOCOg", 100, "spatial", 26488),
    Benchmark("OCID-Ref", "ocid-ref", "ocid-ref-full", "accuracy__OCIDRef-All", 100, "spatial", 18342),
    Benchmark("TallyQA (Simple)", "tally-qa", "tally-qa-full", "accuracy__TallyQA-simple-Accuracy", 100,
              "spatial", 38589),
    Benchmark("TallyQA (Complex)", "tally-qa", "tally-qa-full", "accuracy__TallyQA-complex-Accuracy", 100,
              "spatial", 38589),
    Benchmark("VSR", "vsr", "vsr-full", "accuracy__VSR-ExactMatch", 100, "spatial", 1222),
    Benchmark("AI2D", "ai2d", "ai2d-full", "accuracy__AI2D-final-Accuracy", 100, "spatial", 15501),
    Benchmark("VQAv2", "vqa-v2", "vqa-v2-full", "accuracy", 1, "holistic", 214354),
    Benchmark("GQA", "gqa", "gqa-full", "accuracy", 1, "holistic", 12578),
    Benchmark("VizWiz", "vizwiz", "vizwiz-full", "accuracy__VizWiz-Overall", 1, "holistic", 4319),
    # TextVQA without OCR tokens in the prompt: it measures what the vision backbone reads itself.
    Benchmark("TextVQA", "text-vqa", "text-vqa-full", "accuracy__TextVQA-Pure", 100, "holistic", 5000),
    Benchmark("POPE", "pope", "pope-full", "accuracy__POPE-final-Accuracy", 100, "holistic", 9000),
)


@dataclass
class Results:
    """Scores in percent, ``values[i, j]`` for model i on benchmark j; NaN = missing."""
    models: list[str]
    benchmarks: tuple[Benchmark, ...]
    values: np.ndarray
    notes: list[tuple[str, str]]    # (model, why a result of it is missing), for the report

    def subset(self, models: list[str]) -> "Results":
        rows = [self.models.index(m) for m in models]
        return Results(list(models), self.benchmarks, self.values[rows],
                       [n for n in self.notes if n[0] in models])


# ---------------------------------------------------------------------------------------------
# Reading the harness's tree

def read_metrics(path: Path, dataset_id: str, model_id: str, expected: int) -> dict | str:
    """The ``summary`` of one metrics.json, or a string saying why the result is partial.

    Raises ValueError naming the file when it is not in the layout vlm-evaluation writes."""
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(obj, dict) or not all(k in obj for k in ("dataset", "model", "n_examples", "summary")) \
            or not isinstance(obj["summary"], dict):
        raise ValueError(f"{path}: not a vlm-evaluation metrics.json "
                         "(expected an object with 'dataset', 'model', 'n_examples' and a 'summary' object)")
    # score.py writes the ids it was run with; a mismatch means a copied or hand-edited tree.
    if obj["dataset"] != dataset_id:
        raise ValueError(f"{path}: field 'dataset' is {obj['dataset']!r} but the file sits under {dataset_id}/")
    if obj["model"] != model_id:
        raise ValueError(f"{path}: field 'model' is {obj['model']!r} but the file sits under {model_id}/")
    n = obj["n_examples"]
    if not isinstance(n, int) or isinstance(n, bool):
        raise ValueError(f"{path}: field 'n_examples' must be an integer, got {n!r}")
    if n != expected:
        return f"n_examples={n}, the full split has {expected}"
    examples = obj.get("examples")
    if examples is not None and not isinstance(examples, (dict, list)):
        raise ValueError(f"{path}: field 'examples' must be an object of per-example outputs")
    if examples is not None and len(examples) != n:
        return f"{len(examples)} of {n} examples scored"
    return obj["summary"]


def load_results(results_dir: str | os.PathLike) -> Results:
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such results directory")
    datasets = {(b.family, b.dataset_id): b.expected for b in BENCHMARKS}

    # First pass: every model directory under a known full split belongs to the pool, even if
    # none of its results are usable yet (it then shows as a row of "—").
    summaries: dict[tuple[str, str], tuple[dict, Path]] = {}     # (model, dataset_id) -> (summary, file)
    models: set[str] = set()
    notes: list[tuple[str, str]] = []
    for (family, dataset_id), expected in datasets.items():
        d = root / family / dataset_id
        if not d.is_dir():
            continue
        for mdir in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
            models.add(mdir.name)
            metrics = mdir / "metrics.json"
            if not metrics.is_file():
                if any(mdir.glob("results+rank*.json")):
                    notes.append((mdir.name, f"{dataset_id}: evaluated but not scored (no metrics.json)"))
                continue
            got = read_metrics(metrics, dataset_id, mdir.name, expected)
            if isinstance(got, str):
                notes.append((mdir.name, f"{dataset_id}: partial result ({got}) in {metrics}"))
                continue
            summaries[mdir.name, dataset_id] = (got, metrics)
    if not models:
        raise ValueError(f"{root}: no vlm-evaluation results found (expected "
                         "<dataset_family>/<dataset_id>/<model_id>/metrics.json for the full splits, "
                         "e.g. refcoco/refcoco-full/<model_id>/metrics.json)")

    models_sorted = sorted(models)
    values = np.full((len(models_sorted), len(BENCHMARKS)), np.nan)
    for i, model in enumerate(models_sorted):
        for j, b in enumerate(BENCHMARKS):
            if (model, b.dataset_id) not in summaries:
                continue
            summary, path = summaries[model, b.dataset_id]
            if b.key not in summary:
                raise ValueError(f"{path}: 'summary' has no {b.key!r} "
                                 f"(has {', '.join(sorted(summary)) or 'nothing'})")
            v = summary[b.key]
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ValueError(f"{path}: summary[{b.key!r}] must be a number, got {v!r}")
            if math.isfinite(v):
                values[i, j] = v * b.scale
            else:
                notes.append((model, f"{b.name}: score is {v} in {path}"))
    return Results(models_sorted, BENCHMARKS, values, notes)


# ---------------------------------------------------------------------------------------------
# Numbers

def deltas(values: np.ndarray, baseline_row: int) -> np.ndarray:
    """Per-benchmark difference to the baseline row; missing on either side stays missing."""
    return values - values[baseline_row]


def zscores(values: np.ndarray) -> np.ndarray:
    """Column-wise z-scores over the models that have a value (population std, as vlm-evaluation's
    ``compute_z_scores.py``). Missing entries stay NaN and do not enter mean or std. A benchmark on
    which every present model scores the same (or only one model has a score) is 0 for them."""
    z = np.full_like(values, np.nan)
    for j in range(values.shape[1]):
        col = values[:, j]
        have = ~np.isnan(col)
        if not have.any():
            continue
        mean, std = col[have].mean(), col[have].std()
        z[have, j] = (col[have] - mean) / std if std > 0 else 0.0
    return z


# ---------------------------------------------------------------------------------------------
# Writing

def _fmt(x: float, fmt: str) -> str:
    return MISSING if np.isnan(x) else format(x, fmt)


def markdown_table(models: list[str], benchmarks, values: np.ndarray, fmt: str) -> str:
    head = "| model | " + " | ".join(b.name for b in benchmarks) + " |"
    rule = "|---|" + "---:|" * len(benchmarks)
    rows = [f"| {m} | " + " | ".join(_fmt(v, fmt) for v in row) + " |" for m, row in zip(models, values)]
    return "\n".join([head, rule, *rows])


def report_markdown(shown: Results, pool: list[str], z: np.ndarray, baseline: str | None) -> str:
    b = shown.benchmarks
    groups = ", ".join(f"{g}: {', '.join(x.name for x in b if x.group == g)}" for g in ("spatial", "holistic"))
    parts = [
        "# VLM benchmark comparison",
        "",
        f"Scores in percent from vlm-evaluation `metrics.json` (full splits). {MISSING} = missing "
        f"or partial result, never counted as zero. Benchmarks ({groups}).",
        "",
        "## Scores",
        "",
        markdown_table(shown.models, b, shown.values, ".1f"),
    ]
    if baseline is not None:
        d = deltas(shown.values, shown.models.index(baseline))
        others = [i for i, m in enumerate(shown.models) if m != baseline]
        parts += ["", f"## Deltas against `{baseline}` (percentage points)", "",
                  markdown_table([shown.models[i] for i in others], b, d[others], "+.1f")]
    parts += ["", f"## z-scores (per benchmark, over a pool of {len(pool)} models)", "",
              f"Pool: {', '.join(f'`{m}`' for m in pool)}. Missing results are left out of the mean and std.",
              "", markdown_table(shown.models, b, z, "+.2f")]
    if shown.notes:
        parts += ["", "## Missing or partial results", "", *[f"- `{m}` {why}" for m, why in shown.notes]]
    return "\n".join(parts) + "\n"


def radar_chart(path: Path, models: list[str], benchmarks, z: np.ndarray, title: str) -> None:
    """The paper's radar chart: one axis per benchmark, radius = z-score over the pool.

    A missing value is a gap in the model's polygon (NaN breaks the line), never a point at 0.
    Benchmarks that no shown model has are left off the chart."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prismatic_locality.probe.plots import save_figure

    keep = [j for j in range(z.shape[1]) if not np.isnan(z[:, j]).all()]
    if not keep:
        raise ValueError("no scored benchmark to plot for the selected models")
    z, names = z[:, keep], [benchmarks[j].name for j in keep]
    angles = np.linspace(0, 2 * np.pi, len(names), endpoint=False)
    lo, hi = np.nanmin(z), np.nanmax(z)
    pad = max(0.25 * (hi - lo), 0.5)

    fig, ax = plt.subplots(figsize=(8, 8), subplot_kw={"projection": "polar"})
    ax.set_theta_offset(np.pi / 2)
    ax.set_theta_direction(-1)
    ring = np.linspace(0, 2 * np.pi, 200)
    ax.plot(ring, np.zeros_like(ring), color="grey", lw=0.8, ls="--")    # z = 0: the pool mean
    for i, model in enumerate(models):
        closed = np.append(z[i], z[i, 0])
        ax.plot(np.append(angles, angles[0]), closed, marker="o", ms=4, lw=1.5, label=model)
        if not np.isnan(z[i]).any():
            ax.fill(angles, z[i], alpha=0.08)
    ax.set_xticks(angles)
    ax.set_xticklabels(names, fontsize=9)
    ax.set_ylim(lo - pad, hi + pad)         # the centre is the lowest z, not 0
    ax.set_title(title, pad=24)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()

    save_figure(fig, path, dpi=150, tight=False)


def grouped_bar_chart(path: Path, series: dict[str, list[float]], groups: list[str], ylabel: str, title: str,
                      reference: list[float] | None = None, reference_label: str = "",
                      colours: tuple[str, ...] = ("#9aa5b1", "#2b7bb9", "#e07b39", "#59a14f"), ylim: tuple = (0, 100),
                      size: tuple = (5, 3.4)) -> Path:
    """Scores side by side: one group of bars per benchmark (or task), one bar per model, values on
    the bars; `reference` (e.g. a chance or majority baseline) is a dashed tick over each group."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prismatic_locality.probe.plots import save_figure

    fig, ax = plt.subplots(figsize=size)
    x = np.arange(len(groups))
    width = 0.8 / len(series)
    for j, ((model, vals), colour) in enumerate(zip(series.items(), colours)):
        bars = ax.bar(x + (j - (len(series) - 1) / 2) * width, vals, width, label=model, color=colour)
        ax.bar_label(bars, fmt="%.1f", fontsize=7 if len(series) < 3 else 5.5)
    if reference is not None:
        ax.hlines(reference, x - 0.45, x + 0.45, colors="black", linestyles="dashed", lw=1, label=reference_label)
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    ax.set_ylim(*ylim)
    # below the axes: over the bars it would hide the tallest ones
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(series) + (reference is not None),
              fontsize=7, frameon=False)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def _as_json(models: list[str], benchmarks, values: np.ndarray) -> dict:
    return {m: {b.name: (None if np.isnan(v) else float(v)) for b, v in zip(benchmarks, row)}
            for m, row in zip(models, values)}


def compare(results_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
            baseline: str | None = None, models: list[str] | None = None) -> dict[str, Path]:
    """Everything `locality vlm-compare` does; returns the written files by kind."""
    results = load_results(results_dir)
    pool = results.models
    for m in ([baseline] if baseline else []) + (models or []):
        if m not in pool:
            raise ValueError(f"model {m!r} has no results under {results_dir} (found: {', '.join(pool)})")
    shown_ids = list(models) if models else pool
    if baseline:    # the reference row goes first
        shown_ids = [baseline, *(m for m in shown_ids if m != baseline)]
    # z-scores over the whole pool, like the paper (its pool holds more runs than each chart shows).
    z_pool = zscores(results.values)
    rows = [pool.index(m) for m in shown_ids]
    shown, z = results.subset(shown_ids), z_pool[rows]

    out = Path(out_dir) if out_dir is not None else Path(results_dir) / "vlm-compare"
    files = {"markdown": out / "vlm-compare.md", "json": out / "vlm-compare.json", "radar": out / "radar.png"}
    summary = {
        "results_dir": str(results_dir),
        "benchmarks": [{"name": b.name, "dataset_id": b.dataset_id, "key": b.key, "group": b.group}
                       for b in BENCHMARKS],
        "pool": pool,
        "models": shown_ids,
        "baseline": baseline,
        "scores": _as_json(shown_ids, BENCHMARKS, shown.values),
        "zscores": _as_json(shown_ids, BENCHMARKS, z),
        "notes": [f"{m}: {why}" for m, why in shown.notes],
    }
    if baseline:
        summary["deltas"] = _as_json(shown_ids, BENCHMARKS, deltas(shown.values, shown_ids.index(baseline)))
    radar_chart(files["radar"], shown_ids, BENCHMARKS, z, f"z-scored per benchmark over {len(pool)} models")
    write_json(files["json"], summary)
    write_text(files["markdown"], report_markdown(shown, pool, z, baseline))
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="locality vlm-compare",
        description="Compare vlm-evaluation results (<results>/<family>/<dataset_id>/<model_id>/metrics.json) "
                    "across models: markdown table, deltas against a baseline, z-scored radar chart.")
    p.add_argument("results_dir", help="vlm-evaluation results directory (its --results_dir)")
    p.add_argument("--baseline", help="model id to compute per-benchmark deltas against")
    p.add_argument("--models", help="comma-separated model ids to show, in this order (default: all); "
                                    "z-scores are always over every model found")
    p.add_argument("--out", help="output directory (default: <results_dir>/vlm-compare)")
    args = p.parse_args(argv)
    models = list(dict.fromkeys(m.strip() for m in args.models.split(",") if m.strip())) if args.models else None
    try:
        files = compare(args.results_dir, args.out, args.baseline, models)
    except (ValueError, FileNotFoundError) as e:
        print(f"locality vlm-compare: {e}", file=sys.stderr)
        return 2
    print(files["markdown"].read_text())
    for kind, path in files.items():
        print(f"wrote {kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
