"""Patch-level probing benchmark: local and global macro recall of a frozen backbone.

    python scripts/probe.py --backbone vit_large_patch14_clip_quickgelu_336.openai --dataset coco-stuff --data.root /data/coco
    python scripts/probe.py --backbone runs/align/clip-l-336 --dataset coco-stuff --data.root /data/coco

Same options as `locality probe` (see docs/probe.md).
"""
import sys

from prismatic_locality.probe.run import main

if __name__ == "__main__":
    sys.exit(main())
