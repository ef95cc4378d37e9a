"""`locality probe-compare a.json b.json ...`: several probe runs side by side.

Prints a markdown table (local / global macro recall, and the change against the first run, e.g.
teacher vs aligned) and writes ``compare.md``, ``compare.png`` (grouped bars) and, when the runs
have local object-size strata, ``compare_size.png`` (paper Fig. 8) to ``--out``. For every run
probed on the same classes as the first, ``compare_class_<name>.png`` (paper Fig. 7) shows the
change of local recall per class, and ``compare.md`` names the most improved and declined classes
(COCO-Stuff ranks things and stuff separately).
Arguments may be results.json files or the run directories that contain one.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Optional

from ..fileio import read_json, write_text
from . import plots
from .labels import class_kinds


def load_results(path: str | os.PathLike) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    r = read_json(p, "probe results not found")
    if not isinstance(r, dict) or not ("local" in r or "global" in r) or "backbone" not in r:
        raise ValueError(f"{p}: not a probe results.json (needs 'backbone' and 'local' and/or 'global')")
    r["_path"] = str(p)
    return r


def _recall(r: dict, task: str) -> Optional[float]:
    return r[task]["macro_recall"] if task in r else None


def _pct(v: Optional[float]) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def _delta(v: Optional[float], ref: Optional[float]) -> str:
    return "–" if v is None or ref is None else f"{100 * (v - ref):+.2f}"


def markdown_table(runs: list[dict], names: list[str]) -> str:
    ref = runs[0]
    lines = ["| run | backbone | dataset | head | local | global | Δ local | Δ global |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in zip(names, runs):
        loc, glo = _recall(r, "local"), _recall(r, "global")
        head_cfg = r.get("config", {}).get("head", {})
        view = head_cfg.get("view", "full")
        head = head_cfg.get("kind", "?") + ("" if view == "full" else f" ({view} view)")
        ds = r.get("dataset", {}).get("name", "?")
        lines.append(f"| {name} | {r['backbone'].get('name', '?')} | {ds} | {head} | {_pct(loc)} | {_pct(glo)} | "
                     f"{_delta(loc, _recall(ref, 'local'))} | {_delta(glo, _recall(ref, 'global'))} |")
    lines.append("")
    lines.append(f"Macro recall (%), best epoch; Δ = change against the first run ({names[0]}).")
    return "\n".join(lines)


def class_deltas(ref: dict, run: dict, task: str = "local") -> list[dict]:
    """Per-class recall change of `run` against `ref`, over the classes with val positives in both."""
    a, b = ref[task]["per_class_recall"], run[task]["per_class_recall"]
    return [{"class_id": c, "class": name, "ref": a[c], "run": b[c], "delta": b[c] - a[c]}
            for c, name in enumerate(ref["dataset"]["class_names"]) if a[c] is not None and b[c] is not None]


def _comparable_classes(ref: dict, run: dict, task: str = "local") -> bool:
    names = ref.get("dataset", {}).get("class_names")
    return (bool(names) and names == run.get("dataset", {}).get("class_names")
            and "per_class_recall" in ref.get(task, {}) and "per_class_recall" in run.get(task, {}))


def _listed(rows: list[dict]) -> str:
    return ", ".join(f"{r['class']} ({100 * r['delta']:+.1f})" for r in rows) or "–"


def class_summary(deltas: list[dict], kinds: dict[str, range], name: str, ref_name: str, top: int = 5) -> str:
    """Markdown: how many classes improved, and per kind the most improved and declined."""
    head = f"## Local recall by class: {name} vs {ref_name}"
    if not deltas:
        return f"{head}\n\nNo class has val positives in both runs."
    d = [r["delta"] for r in deltas]
    lines = [head, "", f"Improved on {sum(x > 0 for x in d)} of {len(d)} classes, declined on "
                       f"{sum(x < 0 for x in d)}; median Δ {100 * statistics.median(d):+.2f} (points).", ""]
    for kind, ids in kinds.items():
        rows = sorted((r for r in deltas if r["class_id"] in ids), key=lambda r: r["delta"])
        if rows:
            improved = [r for r in reversed(rows) if r["delta"] > 0][:top]
            declined = [r for r in rows if r["delta"] < 0][:top]
            lines.append(f"- {kind}: most improved {_listed(improved)}; most declined {_listed(declined)}")
    return "\n".join(lines)


def compare(paths: list[str], out: str | os.PathLike, names: Optional[list[str]] = None) -> str:
    runs = [load_results(p) for p in paths]
    if names is None:
        names = [Path(r["backbone"].get("name", f"run{i}").rstrip("/")).name for i, r in enumerate(runs)]
        if len(set(names)) < len(names):  # fall back to the run directories' names
            names = [Path(r["_path"]).parent.name or f"run{i}" for i, r in enumerate(runs)]
    if len(names) != len(runs):
        raise ValueError(f"--names has {len(names)} names for {len(runs)} runs")
    datasets = {r.get("dataset", {}).get("name") for r in runs}
    table = markdown_table(runs, names)
    if len(datasets) > 1:
        table += f"\n\nWarning: the runs use different datasets ({', '.join(sorted(map(str, datasets)))})."
    out = Path(out)
    ref = runs[0]
    for name, r in zip(names[1:], runs[1:]):
        if not _comparable_classes(ref, r):
            continue
        deltas = class_deltas(ref, r)
        kinds = class_kinds(ref["dataset"].get("name", ""), len(ref["dataset"]["class_names"]))
        table += "\n\n" + class_summary(deltas, kinds, name, names[0])
        if deltas:
            plots.plot_class_deltas(deltas, kinds, out / f"compare_class_{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}.png",
                                    title=f"local recall by class: {name} − {names[0]}")
    write_text(out / "compare.md", table + "\n")
    plots.plot_compare(names, [_recall(r, "local") for r in runs], [_recall(r, "global") for r in runs],
                       out / "compare.png")
    sized = {n: r["local"]["size_bins"] for n, r in zip(names, runs) if r.get("local", {}).get("size_bins")}
    binning = lambda bins: bins[0].get("binning", "quantile")  # noqa: E731
    if sized and len({binning(b) for b in sized.values()}) > 1:  # bins of different binnings do not line up
        first = binning(next(iter(sized.values())))
        print(f"compare_size.png: only the runs with {first} size bins (the others: "
              f"{', '.join(n for n, b in sized.items() if binning(b) != first)})", file=sys.stderr)
        sized = {n: b for n, b in sized.items() if binning(b) == first}
    if sized:
        plots.plot_size_recall(sized, out / "compare_size.png", title="local recall by object size")
    return table


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="locality probe-compare", description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="results.json files or probe output directories")
    ap.add_argument("--names", default=None, help="comma-separated display names, one per run")
    ap.add_argument("--out", default="runs/probe-compare", help="directory for compare.md / compare.png")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        table = compare(args.results, args.out, args.names.split(",") if args.names else None)
    except (ValueError, FileNotFoundError) as e:
        print(f"locality probe-compare: error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(f"\nwrote {Path(args.out) / 'compare.md'} and {Path(args.out) / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
