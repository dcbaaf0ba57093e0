#!/usr/bin/env bash
# Ablation "block-only": block (scan-direction) selection only, no token pruning, Vim-S, block keep 0.7 (Block_Only vim-s.sh).
# Only selects configs/ablations/block-only.yaml; the code is the same as the main runs.
#   NGPUS=4 DATA_PATH=/data/imagenet MODEL_PATH=vim_?_midclstok_*.pth bash ablations/block-only.sh [extra main.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
NGPUS=${NGPUS:-4}
DATA_PATH=${DATA_PATH:?set DATA_PATH to the ImageNet folder holding train/ and val/}
MODEL_PATH=${MODEL_PATH:?set MODEL_PATH to the released dense Vim checkpoint of the model in the config}
OUTPUT_DIR=${OUTPUT_DIR:-output/ablation-block-only}
torchrun --standalone --nproc_per_node="$NGPUS" main.py --config configs/ablations/block-only.yaml \
    --data-path "$DATA_PATH" --model-path "$MODEL_PATH" --output_dir "$OUTPUT_DIR" --no_amp "$@"
