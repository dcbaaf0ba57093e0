#!/usr/bin/env bash
# DyVM-Vim-T (token keep 0.9, block keep 0.8): fine-tune from the released dense Vim-Tiny on ImageNet, distilling from it.
# Hyper-parameters: configs/vim-t.yaml (the authors' recipe, 4 GPUs). The LR is given for a global batch of 512 and
# scaled by batch x processes / 512, so another GPU count changes the effective LR the way the authors' rule does.
#   DATA_PATH=/data/imagenet bash scripts/vim-t.sh [extra main.py flags]     (runner and environment: scripts/train.sh)
# The starting checkpoint (vim_t_midclstok_76p1acc.pth, weights under 'model') is the dense Vim-Tiny released by the Vim authors
# (github.com/hustvl/Vim; Hugging Face hub: hustvl/Vim-tiny-midclstok); MODEL_PATH says where it is.
DEFAULT_MODEL_PATH=vim_t_midclstok_76p1acc.pth \
MODEL_SOURCE="the dense Vim-Tiny released by the Vim authors (hustvl/Vim-tiny-midclstok on the Hugging Face hub): download it and set MODEL_PATH" \
    exec bash "$(dirname "$0")/train.sh" vim-t "$@"
