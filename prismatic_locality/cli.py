"""The `locality` command: one entry point, one sub-command per stage.

Each sub-command is a module with ``main(argv: list[str]) -> int | None`` that parses its own
arguments (draccus for config-driven stages), imported only when used so ``locality --help``
stays instant and the core never imports Prismatic.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    # name: (module, one-line help)
    "align": ("prismatic_locality.align.train", "MaskEmbed locality alignment of a timm ViT (torchrun-able)"),
    "finetune": ("prismatic_locality.finetune.train", "ImageNet-style classification fine-tuning: top-1 / top-5"),
    "probe": ("prismatic_locality.probe.run", "patch-level probing benchmark: local and global macro recall"),
    "probe-compare": ("prismatic_locality.probe.compare", "put several probe results.json side by side"),
    # the demo's arguments are parsed before torch is imported, so a usage error is instant
    "demo": ("prismatic_locality.demo.args", "the paper in miniature on a laptop CPU, end to end"),
    "demo-vlm": ("prismatic_locality.demo.vlm_args", "the demo's VLM miniature on a finished `locality demo` directory"),
    "convert": ("prismatic_locality.convert", "convert the paper's released .pth.tar checkpoints"),
    "inspect": ("prismatic_locality.inspect", "attention logits per block, and the feature error with the soft-cap removed"),
    "export": ("prismatic_locality.export", "hub-ready timm / transformers directory of an aligned backbone"),
    "vlm-compare": ("prismatic_locality.vlm_compare", "compare vlm-evaluation results across models"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``prog: error: <what> (see --help)``, exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: locality <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`locality <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"locality: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
