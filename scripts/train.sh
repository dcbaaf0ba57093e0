#!/usr/bin/env bash
# The one training runner: a config of configs/ (a table row: vim-t, vim-s, vim-b; an ablation:
# ablations/token-only, ...; videomamba-s, mambareg-b, ...; or any YAML file) on ImageNet, from a released dense
# Vim / VideoMamba / MambaReg checkpoint, distilling from it.
# scripts/vim-*.sh and ablations/*.sh call it with their config and the dense checkpoint they start from.
#   MODEL_PATH=vim_s_midclstok_80p5acc.pth DATA_PATH=/data/imagenet bash scripts/train.sh vim-s [main.py flags]
# Environment: MODEL_PATH (default: the calling script's), DATA_PATH (train/ and val/ class folders),
# OUTPUT_DIR (default output/NAME); NGPUS, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, DRY_RUN: scripts/launch.sh.
# Several machines: run the same command on each, with NNODES=2 NODE_RANK=0 (then 1) MASTER_ADDR=<first machine>.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/launch.sh
NAME=${1:-}
[ -n "$NAME" ] || fail "usage: bash scripts/train.sh NAME [main.py flags]; NAME: $(cd configs && ls *.yaml ablations/*.yaml | sed 's/\.yaml$//' | tr '\n' ' ')"
shift
if [ -f "$NAME" ]; then CONFIG=$NAME; NAME=$(basename "$NAME" .yaml); else CONFIG=configs/$NAME.yaml; fi
[ -f "$CONFIG" ] || fail "no config '$NAME': $CONFIG does not exist"
# The starting checkpoint first: without it nothing else matters.
MODEL_PATH=${MODEL_PATH:-${DEFAULT_MODEL_PATH:-}}
[ -n "$MODEL_PATH" ] || fail "set MODEL_PATH to the released dense checkpoint the run starts from${MODEL_SOURCE:+ ($MODEL_SOURCE)}"
[ -f "$MODEL_PATH" ] || fail "MODEL_PATH $MODEL_PATH does not exist${MODEL_SOURCE:+: it is $MODEL_SOURCE}"
[ -n "${DATA_PATH:-}" ] || fail "set DATA_PATH to the ImageNet folder holding train/ and val/"
[ -d "$DATA_PATH" ] || fail "DATA_PATH $DATA_PATH is not a folder"
OUTPUT_DIR=${OUTPUT_DIR:-output/${NAME//\//-}}
launch main.py --config "$CONFIG" --data-path "$DATA_PATH" --model-path "$MODEL_PATH" --output_dir "$OUTPUT_DIR" \
    --no_amp "$@"
