#!/usr/bin/env bash
# Trains one table row: configs/NAME.yaml on ImageNet with torchrun (the per-row scripts call this).
#   NGPUS=4 DATA_PATH=/data/imagenet MODEL_PATH=<dense Vim / VideoMamba / MambaReg file> bash scripts/train.sh NAME [...]
# MODEL_PATH defaults to DEFAULT_MODEL_PATH when the calling script sets it.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${1:?usage: bash scripts/train.sh NAME [main.py flags]; NAME = a file of configs/ without .yaml}
shift
CONFIG=configs/$NAME.yaml
[ -f "$CONFIG" ] || { echo "no table row '$NAME': $CONFIG does not exist" >&2; exit 2; }
NGPUS=${NGPUS:-4}
DATA_PATH=${DATA_PATH:?set DATA_PATH to the ImageNet folder holding train/ and val/}
MODEL_PATH=${MODEL_PATH:-${DEFAULT_MODEL_PATH:?set MODEL_PATH to the released dense checkpoint of the backbone}}
OUTPUT_DIR=${OUTPUT_DIR:-output/$NAME}
torchrun --standalone --nproc_per_node="$NGPUS" main.py --config "$CONFIG" \
    --data-path "$DATA_PATH" --model-path "$MODEL_PATH" --output_dir "$OUTPUT_DIR" --no_amp "$@"
