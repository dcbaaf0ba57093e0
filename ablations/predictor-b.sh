#!/usr/bin/env bash
# Ablation "predictor-b": the token-score predictor reads the previous layer's SSM B (direction-averaged) instead of the
# residual stream; token pruning only, Vim-T (Predictor_Input/Predictor-B; 1 GPU x 128, lr 5e-4 for 512).
# Only selects configs/ablations/predictor-b.yaml (which inherits the Vim-Tiny table row and holds what differs); the code
# is that of the main runs. Runner and environment: scripts/train.sh.
#   DATA_PATH=/data/imagenet bash ablations/predictor-b.sh [extra main.py flags]
DEFAULT_MODEL_PATH=vim_t_midclstok_76p1acc.pth \
MODEL_SOURCE="the dense Vim-Tiny released by the Vim authors (hustvl/Vim-tiny-midclstok on the Hugging Face hub): download it and set MODEL_PATH" \
    exec bash "$(dirname "$0")/../scripts/train.sh" ablations/predictor-b "$@"
