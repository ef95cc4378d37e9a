#!/usr/bin/env bash
# Evaluate and score models on every task in tasks.txt with vlm-evaluation, through this repo's
# scripts/evaluate.py and scripts/score.py (vlm-evaluation's own scripts, plugin registered).
#
#   usage: vlm-evaluation-configs/run_all.sh <prepared datasets root> [model_id ...]
#     default models: every config in vlm-evaluation-configs/evaluate/
#     NPROC=<GPUs>   accelerate processes for evaluate.py (default 1)
#
# Run it from the working directory the configs' relative paths (runs/, results/) refer to; for
# GQA's scorer that directory must also hold the vlm-evaluation clone as ./vlm-evaluation (docs/vlm.md).
# Finished (model, task) pairs are skipped by vlm-evaluation itself (an existing metrics.json).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
datasets=${1:?usage: run_all.sh <prepared datasets root> [model_id ...]}
shift
LAUNCH=${LAUNCH:-accelerate launch --num_processes=${NPROC:-1}}
PYTHON=${PYTHON:-python}

models=("$@")
if [ ${#models[@]} -eq 0 ]; then
    for f in "$here"/evaluate/*.yaml; do models+=("$(basename "$f" .yaml)"); done
fi
tasks=$(grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$here/tasks.txt")

for m in "${models[@]}"; do
    for kind in evaluate score; do
        [ -f "$here/$kind/$m.yaml" ] || { echo "run_all.sh: no config $here/$kind/$m.yaml" >&2; exit 2; }
    done
done
for m in "${models[@]}"; do
    for t in $tasks; do
        echo "=== $m / $t"
        $LAUNCH "$repo/scripts/evaluate.py" --config_path "$here/evaluate/$m.yaml" \
            --dataset.type "$t" --dataset.root_dir "$datasets"
        $PYTHON "$repo/scripts/score.py" --config_path "$here/score/$m.yaml" \
            --dataset.type "$t" --dataset.root_dir "$datasets"
    done
done
