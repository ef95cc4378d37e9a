"""`locality probe-compare a.json b.json ...`: several probe runs side by side.

Prints a markdown table (local / global macro recall, and the change against the first run, e.g.
teacher vs aligned) and writes ``compare.md``, ``compare.png`` (grouped bars) and, when the runs
have local object-size strata, ``compare_size.png`` (paper Fig. 8) to ``--out``.
Arguments may be results.json files or the run directories that contain one.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from ..checkpoint import read_json, write_text
from . import plots


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
        head = r.get("config", {}).get("head", {}).get("kind", "?")
        ds = r.get("dataset", {}).get("name", "?")
        lines.append(f"| {name} | {r['backbone'].get('name', '?')} | {ds} | {head} | {_pct(loc)} | {_pct(glo)} | "
                     f"{_delta(loc, _recall(ref, 'local'))} | {_delta(glo, _recall(ref, 'global'))} |")
    lines.append("")
    lines.append(f"Macro recall (%), best epoch; Δ = change against the first run ({names[0]}).")
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
    write_text(out / "compare.md", table + "\n")
    plots.plot_compare(names, [_recall(r, "local") for r in runs], [_recall(r, "global") for r in runs],
                       out / "compare.png")
    sized = {n: r["local"]["size_bins"] for n, r in zip(names, runs) if r.get("local", {}).get("size_bins")}
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
