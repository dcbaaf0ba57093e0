#!/usr/bin/env bash
# Ablation "block-only": block (scan-direction) selection only, no token pruning, Vim-S, block keep 0.7 (Block_Only vim-s.sh).
# Only selects configs/ablations/block-only.yaml (which inherits the Vim-Small table row and holds what differs); the code
# is that of the main runs. Runner and environment: scripts/train.sh.
#   DATA_PATH=/data/imagenet bash ablations/block-only.sh [extra main.py flags]
DEFAULT_MODEL_PATH=vim_s_midclstok_80p5acc.pth \
MODEL_SOURCE="the dense Vim-Small released by the Vim authors (hustvl/Vim-small-midclstok on the Hugging Face hub): download it and set MODEL_PATH" \
    exec bash "$(dirname "$0")/../scripts/train.sh" ablations/block-only "$@"
