"""Prismatic's own `scripts/pretrain.py`, unchanged, with the locality-alignment plugin registered first.

    torchrun --standalone --nnodes 1 --nproc-per-node 8 scripts/pretrain.py \\
        --model.type aligned-decoder-siglip-so400m-384+7b --dataset.dataset_root_dir /data/llava --trackers '[jsonl]'

Same CLI as upstream (draccus). ``--model.vision_backbone_id X`` without ``--model.type`` is upstream's
default model config with X (the plugin names that default for draccus; see docs/prismatic.md).
Every torchrun worker runs this file, so each one imports the plugin before upstream parses its config. Upstream's scripts are not installed with the package, so the
script is found at ``$PRISMATIC_PRETRAIN_SCRIPT`` or, for an editable/source install of Prismatic,
at ``<prismatic checkout>/scripts/pretrain.py``.
"""
import os
import runpy
import sys
from pathlib import Path

import prismatic_locality.prismatic as plugin

ENV = "PRISMATIC_PRETRAIN_SCRIPT"


def upstream_script() -> Path:
    if os.environ.get(ENV):
        candidates = [Path(os.environ[ENV]).expanduser()]
    else:
        import prismatic

        candidates = [Path(prismatic.__file__).resolve().parents[1] / "scripts" / "pretrain.py"]
    for path in candidates:
        if path.is_file():
            return path
    sys.exit(f"scripts/pretrain.py: Prismatic's pretrain script not found at {candidates[0]}; install Prismatic "
             f"from a source checkout (pip install -e) or set {ENV}=/path/to/prismatic-vlms/scripts/pretrain.py")


if __name__ == "__main__":
    if not plugin.PRISMATIC_AVAILABLE:
        sys.exit("scripts/pretrain.py: TRI-ML Prismatic is not installed (see docs/prismatic.md)")
    script = upstream_script()
    sys.argv[0] = str(script)
    runpy.run_path(str(script), run_name="__main__")
