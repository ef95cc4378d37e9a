"""vlm-evaluation's `scripts/score.py`, unchanged and with the same CLI, with the plugin registered.

    python scripts/score.py --config_path vlm-evaluation-configs/score/<model>.yaml \
        --dataset.type refcoco-full --dataset.root_dir <prepared datasets>

Writes <results_dir>/<family>/<dataset_id>/<model_id>/metrics.json, which `locality vlm-compare` reads.
See docs/vlm.md for the whole loop.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _vlm_eval import run  # noqa: E402

if __name__ == "__main__":
    run("score.py", loads_models=False)
