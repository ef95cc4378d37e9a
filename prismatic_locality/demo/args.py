"""`locality demo`'s command line, parsed before the demo imports torch and timm (seconds), so a
usage error or ``--help`` answers at once; the run itself is `demo.run`."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from ..cli import ArgumentParser


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="locality demo",
                       description="`locality demo`: the paper's claim in miniature, end to end on a CPU, nothing downloaded.")
    p.add_argument("--seed", type=int, default=0, help="scenes, MaskEmbed order/masks and probe heads (default 0)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: exercises every stage in < 90 s")
    p.add_argument("--out", default="runs/demo", help="report directory (default runs/demo)")
    p.add_argument("--teacher", default=None, help="teacher .safetensors (default: the shipped one)")
    p.add_argument("--train-teacher", action="store_true", help="train the teacher here instead of loading it")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--softcap", type=float, default=30.0,
                   help="MaskEmbed encoder's attention soft-cap (default 30, the paper's; 0 = none, plain attention)")
    p.add_argument("--vlm", action="store_true",
                   help="then the VLM miniature: 3 backbone+adapter configurations on templated questions (+<= 10 min)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="MaskEmbed and probe heads; auto = bf16 on a CPU with hardware bf16, else fp32")
    p.add_argument("--objective", choices=("maskembed", "clipself"), default="maskembed",
                   help="what aligns the teacher: maskembed (default) or clipself (recipe demo-clipself)")
    p.add_argument("--mim-steps", type=_non_negative, default=0, metavar="N",
                   help="first MIM-tune the teacher for N steps (recipe demo-mim), then align with that model as "
                        "MaskEmbed's teacher; the probe still compares the original teacher (default 0: no MIM)")
    p.add_argument("--align-steps", type=_positive, default=None, metavar="N",
                   help="MaskEmbed steps instead of the recipe's 600 (fp32) / 1200 (bf16); about 0.4 s each on 2 fp32 cores")
    p.add_argument("--probe-heads", type=_positive, default=None, metavar="K",
                   help="probe heads per (model, task), averaged (default 2); each adds about 85 s on 2 cores")
    return p


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {n}")
        return n
    return parse


_non_negative, _positive = _at_least(0), _at_least(1)


def parse(argv: list[str]) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.mim_steps and args.objective != "maskembed":  # a clipself teacher must have a pooled output
        p.error("--mim-steps needs --objective maskembed (the MIM-tuned model is MaskEmbed's teacher)")
    if args.vlm and args.objective != "maskembed":
        p.error("--vlm needs --objective maskembed (its decoder adapter is the MaskEmbed decoder; clipself trains none)")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parse(argv)  # usage errors and --help end here, before the heavy imports
    from .run import main as run

    return run(argv)
