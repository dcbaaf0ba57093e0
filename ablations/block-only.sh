#!/usr/bin/env bash
# Ablation "block-only": block (scan-direction) selection only, no token pruning, Vim-S, block keep 0.7 (Block_Only vim-s.sh).
# Only selects configs/ablations/block-only.yaml; the code is the same as the main runs.
#   NGPUS=4 DATA_PATH=/data/imagenet MODEL_PATH=vim_?_midclstok_*.pth bash ablations/block-only.sh [extra main.py flags]
exec bash "$(dirname "$0")/run.sh" block-only "$@"
