#!/usr/bin/env bash
# DyVM-Vim-B (token keep 0.7, block keep 0.7): fine-tune from the released dense Vim-Base on ImageNet, distilling from it.
# Hyper-parameters: configs/vim-b.yaml (the authors' recipe, 4 GPUs). The LR is given for a global batch of 512 and
# scaled by batch x processes / 512, so another GPU count changes the effective LR the way the authors' rule does.
#   DATA_PATH=/data/imagenet bash scripts/vim-b.sh [extra main.py flags]     (runner and environment: scripts/train.sh)
# The starting checkpoint (vim_b_midclstok_81p9acc.pth, weights under 'model') is the dense Vim-Base released by the Vim authors
# (github.com/hustvl/Vim; Hugging Face hub: hustvl/Vim-base-midclstok); MODEL_PATH says where it is.
DEFAULT_MODEL_PATH=vim_b_midclstok_81p9acc.pth \
MODEL_SOURCE="the dense Vim-Base released by the Vim authors (hustvl/Vim-base-midclstok on the Hugging Face hub): download it and set MODEL_PATH" \
    exec bash "$(dirname "$0")/train.sh" vim-b "$@"
