#!/usr/bin/env bash
# Evaluate a trained DyVM (or dense Vim) on ImageNet val: top-1/top-5 (raw and EMA), tokens kept per stage,
# realised block keep ratio (overall and per layer), parameters, MACs in both conventions, images/s of the model
# and of its dense teacher measured in the same run. Results: $OUTPUT_DIR/eval.json.
#   CONFIG=configs/vim-s.yaml MODEL_PATH=output/vim-s/best_checkpoint.pth DATA_PATH=/data/imagenet bash scripts/eval.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NGPUS=${NGPUS:-1}
CONFIG=${CONFIG:-configs/vim-s.yaml}
DATA_PATH=${DATA_PATH:?set DATA_PATH to the ImageNet folder holding train/ and val/}
MODEL_PATH=${MODEL_PATH:?set MODEL_PATH to a trained checkpoint (e.g. output/vim-s/best_checkpoint.pth)}
OUTPUT_DIR=${OUTPUT_DIR:-output/eval}
torchrun --standalone --nproc_per_node="$NGPUS" main.py --config "$CONFIG" --eval \
    --data-path "$DATA_PATH" --model-path "$MODEL_PATH" --output_dir "$OUTPUT_DIR" "$@"
