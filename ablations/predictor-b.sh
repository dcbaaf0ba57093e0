#!/usr/bin/env bash
# Ablation "predictor-b": the token-score predictor reads the previous layer's SSM B (direction-averaged) instead of the
# Only selects configs/ablations/predictor-b.yaml; the code is the same as the main runs.
#   NGPUS=4 DATA_PATH=/data/imagenet MODEL_PATH=vim_?_midclstok_*.pth bash ablations/predictor-b.sh [extra main.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
NGPUS=${NGPUS:-4}
DATA_PATH=${DATA_PATH:?set DATA_PATH to the ImageNet folder holding train/ and val/}
MODEL_PATH=${MODEL_PATH:?set MODEL_PATH to the released dense Vim checkpoint of the model in the config}
OUTPUT_DIR=${OUTPUT_DIR:-output/ablation-predictor-b}
torchrun --standalone --nproc_per_node="$NGPUS" main.py --config configs/ablations/predictor-b.yaml \
    --data-path "$DATA_PATH" --model-path "$MODEL_PATH" --output_dir "$OUTPUT_DIR" --no_amp "$@"
