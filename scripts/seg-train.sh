#!/usr/bin/env bash
# Trains one segmentation table row: configs/seg/NAME.yaml on ADE20K with torchrun (seg-vim-t.sh / seg-vim-s.sh
# call this), then evaluates the last checkpoint (mIoU/mAcc/aAcc, tokens, gates, MACs, images/s).
#   DATA_PATH=/data/ADEChallengeData2016 MODEL_PATH=<dense Vim file> bash scripts/seg-train.sh NAME [main.py seg flags]
# NGPUS defaults to the number of GPUs visible to torch (CUDA_VISIBLE_DEVICES), 1 without GPUs. The images per
# GPU are the config's, so the global batch is NGPUS x that (the authors ran 2 GPUs).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
command -v "$PYTHON" >/dev/null || PYTHON=python3
NAME=${1:?usage: bash scripts/seg-train.sh NAME [main.py seg flags]; NAME = a file of configs/seg/ without .yaml}
shift
CONFIG=configs/seg/$NAME.yaml
[ -f "$CONFIG" ] || { echo "no segmentation row '$NAME': $CONFIG does not exist" >&2; exit 2; }
NGPUS=${NGPUS:-$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))")}
DATA_PATH=${DATA_PATH:?set DATA_PATH to ADEChallengeData2016 (images/ and annotations/)}
MODEL_PATH=${MODEL_PATH:-${DEFAULT_MODEL_PATH:?set MODEL_PATH to the released dense Vim checkpoint}}
OUTPUT_DIR=${OUTPUT_DIR:-output/seg-$NAME}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
torchrun --standalone --nproc_per_node="$NGPUS" main.py seg --config "$CONFIG" \
    --data-path "$DATA_PATH" --model-path "$MODEL_PATH" --output_dir "$OUTPUT_DIR" "$@"
torchrun --standalone --nproc_per_node="$NGPUS" main.py seg --config "$CONFIG" --data-path "$DATA_PATH" \
    --model-path "$OUTPUT_DIR/checkpoint.pth" --eval --output_dir "$OUTPUT_DIR/eval" "$@"
