#!/usr/bin/env bash
# Ablation "random": random token pruning (no predictor, no gates), Vim-T, keep 0.7 per stage (Pruning_Strategy/Random).
# Only selects configs/ablations/random.yaml; the code is the same as the main runs.
#   NGPUS=4 DATA_PATH=/data/imagenet MODEL_PATH=vim_?_midclstok_*.pth bash ablations/random.sh [extra main.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
NGPUS=${NGPUS:-4}
DATA_PATH=${DATA_PATH:?set DATA_PATH to the ImageNet folder holding train/ and val/}
MODEL_PATH=${MODEL_PATH:?set MODEL_PATH to the released dense Vim checkpoint of the model in the config}
OUTPUT_DIR=${OUTPUT_DIR:-output/ablation-random}
torchrun --standalone --nproc_per_node="$NGPUS" main.py --config configs/ablations/random.yaml \
    --data-path "$DATA_PATH" --model-path "$MODEL_PATH" --output_dir "$OUTPUT_DIR" --no_amp "$@"
