#!/usr/bin/env bash
# Evaluate a trained DyVM (or dense Vim) on ImageNet val: top-1/top-5 (raw and EMA), tokens kept per stage,
# realised block keep ratio (overall and per layer), parameters, MACs in both conventions, images/s of the model
# and of its dense twin measured in the same run. Results: $OUTPUT_DIR/eval.json (and eval_args.yaml).
#   MODEL_PATH=output/vim-s/best_checkpoint.pth DATA_PATH=/data/imagenet bash scripts/eval.sh [main.py flags]
# Environment: CONFIG (default configs/vim-s.yaml), OUTPUT_DIR (default output/eval); NGPUS ...: scripts/launch.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/launch.sh
CONFIG=${CONFIG:-configs/vim-s.yaml}
[ -f "$CONFIG" ] || fail "CONFIG $CONFIG does not exist"
[ -n "${MODEL_PATH:-}" ] || fail "set MODEL_PATH to a trained checkpoint (e.g. output/vim-s/best_checkpoint.pth)"
[ -f "$MODEL_PATH" ] || fail "MODEL_PATH $MODEL_PATH does not exist"
[ -n "${DATA_PATH:-}" ] || fail "set DATA_PATH to the ImageNet folder holding val/"
[ -d "$DATA_PATH" ] || fail "DATA_PATH $DATA_PATH is not a folder"
OUTPUT_DIR=${OUTPUT_DIR:-output/eval}
launch main.py --config "$CONFIG" --eval --data-path "$DATA_PATH" --model-path "$MODEL_PATH" \
    --output_dir "$OUTPUT_DIR" "$@"
