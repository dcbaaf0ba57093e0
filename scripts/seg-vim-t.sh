#!/usr/bin/env bash
# DyVM-Vim-T + UperNet on ADE20K (token keep 0.9 per stage, block keep 0.8): configs/seg/dyvm-vim-t-80k.yaml, the
# authors' recipe (AdamW lr 6e-5, weight decay 0.01, layer decay 0.92, 1500 warm-up iterations, poly schedule,
# 8 images per GPU, 512 crops, 80k iterations), initialised from the released dense Vim-T classifier.
#   DATA_PATH=/data/ADEChallengeData2016 MODEL_PATH=vim_t_midclstok_76p1acc.pth bash scripts/seg-vim-t.sh [flags]
# NGPUS: default all visible GPUs (the authors used 2). Add --amp for bf16 autocast.
DEFAULT_MODEL_PATH=vim_t_midclstok_76p1acc.pth exec bash "$(dirname "$0")/seg-train.sh" dyvm-vim-t-80k "$@"
