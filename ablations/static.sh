#!/usr/bin/env bash
# Ablation "static": static (evenly spaced) token pruning, no predictor, no gates, Vim-T, keep 0.7 per stage (Pruning_Strategy/Static).
# Unlike the reference, dropped tokens stay dropped (decisions are nested as at inference).
# Only selects configs/ablations/static.yaml (which inherits the Vim-Tiny table row and holds what differs); the code
# is that of the main runs. Runner and environment: scripts/train.sh.
#   DATA_PATH=/data/imagenet bash ablations/static.sh [extra main.py flags]
DEFAULT_MODEL_PATH=vim_t_midclstok_76p1acc.pth \
MODEL_SOURCE="the dense Vim-Tiny released by the Vim authors (hustvl/Vim-tiny-midclstok on the Hugging Face hub): download it and set MODEL_PATH" \
    exec bash "$(dirname "$0")/../scripts/train.sh" ablations/static "$@"
