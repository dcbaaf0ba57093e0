#!/usr/bin/env bash
# DyVM-MambaReg-S (token keep 0.7, block keep 0.8): fine-tune from the released dense Mamba-R Small on ImageNet,
# distilling from it. Hyper-parameters: configs/mambareg-s.yaml (the authors' recorded training run, 4 GPUs; their
# mambareg-s.sh is an evaluation script). LR for a global batch of 512, scaled by batch x NGPUS / 512.
#   NGPUS=4 DATA_PATH=/data/imagenet MODEL_PATH=mambar_small_patch16_224.pth bash scripts/mambareg-s.sh [flags]
DEFAULT_MODEL_PATH=mambar_small_patch16_224.pth \
MODEL_SOURCE="the dense Mamba-R Small released by its authors (Wangf3014/Mamba-Reg on the Hugging Face hub): download it and set MODEL_PATH" \
    exec bash "$(dirname "$0")/train.sh" mambareg-s "$@"
