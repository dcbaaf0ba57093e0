#!/usr/bin/env bash
# DyVM-VideoMamba-T (token keep 0.9, block keep 0.8): fine-tune from the released dense VideoMamba-Ti on ImageNet,
# distilling from it. Hyper-parameters: configs/videomamba-t.yaml (the authors' recipe, 4 GPUs). The LR is given for a
# global batch of 512 and scaled by batch x NGPUS / 512, so another GPU count changes the effective LR the way the
# authors' rule does.
#   NGPUS=4 DATA_PATH=/data/imagenet MODEL_PATH=videomamba_t16_in1k_res224.pth bash scripts/videomamba-t.sh [flags]
DEFAULT_MODEL_PATH=videomamba_t16_in1k_res224.pth \
MODEL_SOURCE="the dense VideoMamba-Ti ImageNet-1K model released by the VideoMamba authors (OpenGVLab/VideoMamba model zoo): download it and set MODEL_PATH" \
    exec bash "$(dirname "$0")/train.sh" videomamba-t "$@"
