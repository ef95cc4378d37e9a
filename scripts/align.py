"""MaskEmbed locality alignment, torchrun-able.

    torchrun --standalone --nproc-per-node 4 scripts/align.py --recipe clip-l-336 --data.root /data/imagenet21k
    python scripts/align.py --recipe demo --data.root runs/demo-data --teacher.weights teacher.safetensors

Same options as `locality align` (see docs/align.md).
"""
import sys

from prismatic_locality.align.train import main

if __name__ == "__main__":
    sys.exit(main())
