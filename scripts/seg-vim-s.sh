#!/usr/bin/env bash
# DyVM-Vim-S + UperNet on ADE20K (token keep 0.8 per stage, block keep 0.8): configs/seg/dyvm-vim-s-80k.yaml, the
# authors' recipe (AdamW lr 1.2e-4, weight decay 0.01, layer decay 0.92, 1500 warm-up iterations, poly schedule,
# 16 images per GPU, 512 crops, 80k iterations), initialised from the released dense Vim-S classifier.
#   DATA_PATH=/data/ADEChallengeData2016 MODEL_PATH=vim_s_midclstok_80p5acc.pth bash scripts/seg-vim-s.sh [flags]
# NGPUS: default all visible GPUs (the authors used 2). Add --amp for bf16 autocast.
DEFAULT_MODEL_PATH=vim_s_midclstok_80p5acc.pth exec bash "$(dirname "$0")/seg-train.sh" dyvm-vim-s-80k "$@"
