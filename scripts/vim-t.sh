#!/usr/bin/env bash
# DyVM-Vim-T (token keep 0.9, block keep 0.8): fine-tune from the released dense Vim on ImageNet, distilling from it.
# Hyper-parameters: configs/vim-t.yaml (the authors' recipe, 4 GPUs). The LR is given for a global batch of 512 and
# scaled by batch x NGPUS / 512, so another GPU count changes the effective LR the way the authors' rule does.
#   NGPUS=4 DATA_PATH=/data/imagenet MODEL_PATH=vim_t_midclstok_76p1acc.pth bash scripts/vim-t.sh [extra main.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
NGPUS=${NGPUS:-4}
DATA_PATH=${DATA_PATH:?set DATA_PATH to the ImageNet folder holding train/ and val/}
MODEL_PATH=${MODEL_PATH:-vim_t_midclstok_76p1acc.pth}
OUTPUT_DIR=${OUTPUT_DIR:-output/vim-t}
torchrun --standalone --nproc_per_node="$NGPUS" main.py --config configs/vim-t.yaml \
    --data-path "$DATA_PATH" --model-path "$MODEL_PATH" --output_dir "$OUTPUT_DIR" --no_amp "$@"
