#!/usr/bin/env bash
# DyVM-MambaReg-B (token keep 0.7, block keep 0.7): fine-tune from the released dense Mamba-R Base on ImageNet,
# distilling from it. Hyper-parameters: configs/mambareg-b.yaml (the authors' mambareg-b.sh, 4 GPUs). LR for a global
# batch of 512, scaled by batch x NGPUS / 512.
#   NGPUS=4 DATA_PATH=/data/imagenet MODEL_PATH=mambar_base_patch16_224.pth bash scripts/mambareg-b.sh [flags]
DEFAULT_MODEL_PATH=mambar_base_patch16_224.pth \
MODEL_SOURCE="the dense Mamba-R Base released by its authors (Wangf3014/Mamba-Reg on the Hugging Face hub): download it and set MODEL_PATH" \
    exec bash "$(dirname "$0")/train.sh" mambareg-b "$@"
