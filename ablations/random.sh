#!/usr/bin/env bash
# Ablation "random": random token pruning (no predictor, no gates), Vim-T, keep 0.7 per stage (Pruning_Strategy/Random).
# Only selects configs/ablations/random.yaml; the code is the same as the main runs.
#   NGPUS=4 DATA_PATH=/data/imagenet MODEL_PATH=vim_?_midclstok_*.pth bash ablations/random.sh [extra main.py flags]
exec bash "$(dirname "$0")/run.sh" random "$@"
