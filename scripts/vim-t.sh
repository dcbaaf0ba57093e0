#!/usr/bin/env bash
# DyVM-Vim-T (token keep 0.9, block keep 0.8): fine-tune from the released dense Vim on ImageNet, distilling from it.
# Hyper-parameters: configs/vim-t.yaml (the authors' recipe, 4 GPUs). The LR is given for a global batch of 512 and
# scaled by batch x NGPUS / 512, so another GPU count changes the effective LR the way the authors' rule does.
#   NGPUS=4 DATA_PATH=/data/imagenet MODEL_PATH=vim_t_midclstok_76p1acc.pth bash scripts/vim-t.sh [extra main.py flags]
DEFAULT_MODEL_PATH=vim_t_midclstok_76p1acc.pth exec bash "$(dirname "$0")/train.sh" vim-t "$@"
