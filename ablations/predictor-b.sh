#!/usr/bin/env bash
# Ablation "predictor-b": the token-score predictor reads the previous layer's SSM B (direction-averaged) instead of the
# Only selects configs/ablations/predictor-b.yaml; the code is the same as the main runs.
#   NGPUS=4 DATA_PATH=/data/imagenet MODEL_PATH=vim_?_midclstok_*.pth bash ablations/predictor-b.sh [extra main.py flags]
exec bash "$(dirname "$0")/run.sh" predictor-b "$@"
