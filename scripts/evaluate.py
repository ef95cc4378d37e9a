"""vlm-evaluation's `scripts/evaluate.py`, unchanged and with the same CLI, with aligned models loadable.

    accelerate launch --num_processes=8 scripts/evaluate.py \
        --config_path vlm-evaluation-configs/evaluate/<model>.yaml --dataset.type refcoco-full \
        --dataset.root_dir <prepared datasets>

See docs/vlm.md for the whole loop.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _vlm_eval import run  # noqa: E402

if __name__ == "__main__":
    run("evaluate.py", loads_models=True)
