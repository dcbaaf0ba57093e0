#!/usr/bin/env bash
# DyVM-VideoMamba-S (token keep 0.7, block keep 0.8): fine-tune from the released dense VideoMamba-S on ImageNet,
# distilling from it. Hyper-parameters: configs/videomamba-s.yaml (the authors' recipe, 4 GPUs; LR for a global batch
# of 512, scaled by batch x NGPUS / 512).
# The starting file is VideoMamba-S's own videomamba_s16_in1k_res224.pth. The authors' videomamba-s.sh loads the Vim-S
# file vim_s_midclstok_80p5acc.pth instead, by mistake: its names and shapes match, so their loader took it silently,
# but those weights expect the class token in the middle and the halved sum of the two directions, not VideoMamba's
# first class token and plain sum. main.py refuses a checkpoint that records another backbone.
#   NGPUS=4 DATA_PATH=/data/imagenet MODEL_PATH=videomamba_s16_in1k_res224.pth bash scripts/videomamba-s.sh [flags]
DEFAULT_MODEL_PATH=videomamba_s16_in1k_res224.pth \
MODEL_SOURCE="the dense VideoMamba-S ImageNet-1K model released by the VideoMamba authors (OpenGVLab/VideoMamba model zoo): download it and set MODEL_PATH" \
    exec bash "$(dirname "$0")/train.sh" videomamba-s "$@"
