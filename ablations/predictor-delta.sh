#!/usr/bin/env bash
# Ablation "predictor-delta": the token-score predictor reads the previous layer's raw SSM delta (direction-averaged) instead of the
# Only selects configs/ablations/predictor-delta.yaml; the code is the same as the main runs.
#   NGPUS=4 DATA_PATH=/data/imagenet MODEL_PATH=vim_?_midclstok_*.pth bash ablations/predictor-delta.sh [extra main.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
NGPUS=${NGPUS:-4}
DATA_PATH=${DATA_PATH:?set DATA_PATH to the ImageNet folder holding train/ and val/}
MODEL_PATH=${MODEL_PATH:?set MODEL_PATH to the released dense Vim checkpoint of the model in the config}
OUTPUT_DIR=${OUTPUT_DIR:-output/ablation-predictor-delta}
torchrun --standalone --nproc_per_node="$NGPUS" main.py --config configs/ablations/predictor-delta.yaml \
    --data-path "$DATA_PATH" --model-path "$MODEL_PATH" --output_dir "$OUTPUT_DIR" --no_amp "$@"
