#!/usr/bin/env bash
# Ablation "token-only": token pruning only (no direction gates), Vim-S, token keep 0.8 (the authors' Token_Only vim-s.sh).
# Only selects configs/ablations/token-only.yaml; the code is the same as the main runs.
#   NGPUS=4 DATA_PATH=/data/imagenet MODEL_PATH=vim_?_midclstok_*.pth bash ablations/token-only.sh [extra main.py flags]
exec bash "$(dirname "$0")/run.sh" token-only "$@"
