"""`locality demo-vlm`'s command line, parsed before torch is imported (as `demo/args.py`); the run
itself is `demo.run.run_vlm_on_dir`."""
from __future__ import annotations

import sys
from typing import Optional

from ..cli import ArgumentParser


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="locality demo-vlm",
                       description="The demo's VLM miniature on a finished `locality demo` directory: reuses its "
                                   "scenes, teacher, aligned checkpoint and feature cache; adds a `vlm` section to "
                                   "its results.json and report.md, and vlm.png.")
    p.add_argument("--demo-dir", required=True, help="a finished `locality demo --out` directory")
    p.add_argument("--quick", action="store_true", help="tiny VLM sizes (seconds; numbers meaningless)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    build_parser().parse_args(argv)  # usage errors and --help end here, before the heavy imports
    from .run import main_vlm

    return main_vlm(argv)
