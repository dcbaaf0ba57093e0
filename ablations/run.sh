#!/usr/bin/env bash
# Runs one ablation: its config (configs/ablations/NAME.yaml) is all that differs from the main runs.
#   NGPUS=4 DATA_PATH=/data/imagenet MODEL_PATH=vim_?_midclstok_*.pth bash ablations/run.sh NAME [extra main.py flags]
# On another backbone: add its --model and give its dense file, e.g.
#   MODEL_PATH=mambar_small_patch16_224.pth bash ablations/run.sh random --model MambaReg-Small
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${1:?usage: bash ablations/run.sh NAME [main.py flags]; NAME = a file of configs/ablations without .yaml}
shift
CONFIG=configs/ablations/$NAME.yaml
[ -f "$CONFIG" ] || { echo "no ablation '$NAME': $CONFIG does not exist" >&2; exit 2; }
NGPUS=${NGPUS:-4}
DATA_PATH=${DATA_PATH:?set DATA_PATH to the ImageNet folder holding train/ and val/}
MODEL_PATH=${MODEL_PATH:?set MODEL_PATH to the released dense checkpoint of the model in the config}
OUTPUT_DIR=${OUTPUT_DIR:-output/ablation-$NAME}
torchrun --standalone --nproc_per_node="$NGPUS" main.py --config "$CONFIG" \
    --data-path "$DATA_PATH" --model-path "$MODEL_PATH" --output_dir "$OUTPUT_DIR" --no_amp "$@"
