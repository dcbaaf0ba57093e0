#!/usr/bin/env bash
# The demo, on CPU with the embedded Animal-MNIST set (no download, no GPU):
#   1. train a small dense Vim from scratch                    (configs/demo-dense.yaml)
#   2. fine-tune DyVM from it, distilling from it               (configs/demo-dyvm.yaml)
#   3. evaluate both (accuracy, MACs in both conventions, tokens kept, block ratio, images/s)
#   4. write $OUT/report.md with figures (kept tokens per stage over images, training curves)
# 6.6 to 7.9 minutes on 2 cores (docs/results.md). OUT (default output/demo) and
# extra main.py flags for every step (e.g. --epochs 1 --no-progress) can be given:
#   OUT=/tmp/demo bash scripts/demo.sh --epochs 1
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
command -v "$PYTHON" >/dev/null || PYTHON=python3
OUT=${OUT:-output/demo}
# torch's OpenMP threads spin while waiting; on a small shared CPU that makes a busy machine 10-20x slower.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
start=$(date +%s)
rm -rf "$OUT/dense" "$OUT/dyvm"
echo "== 1/4 dense Vim on the embedded data set"
"$PYTHON" main.py --config configs/demo-dense.yaml --output_dir "$OUT/dense" "$@"
echo "== 2/4 DyVM fine-tuned from it with distillation"
"$PYTHON" main.py --config configs/demo-dyvm.yaml --model-path "$OUT/dense/best_checkpoint.pth" \
    --output_dir "$OUT/dyvm" "$@"
echo "== 3/4 evaluation"
"$PYTHON" main.py --config configs/demo-dense.yaml --model-path "$OUT/dense/best_checkpoint.pth" --eval \
    --output_dir "$OUT/dense" "$@"
"$PYTHON" main.py --config configs/demo-dyvm.yaml --model-path "$OUT/dyvm/best_checkpoint.pth" --eval \
    --output_dir "$OUT/dyvm" "$@"
echo "== 4/4 report"
"$PYTHON" -m dyvm.report --dense "$OUT/dense" --dyvm "$OUT/dyvm" --out "$OUT" --wall-clock-s $(( $(date +%s) - start ))
