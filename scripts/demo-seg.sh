#!/usr/bin/env bash
# The segmentation demo, on CPU with scenes made from the embedded Animal-MNIST silhouettes (no download, no GPU):
#   1. train a small dense Vim segmenter (UperNet) from scratch        (configs/seg/demo-dense.yaml)
#   2. fine-tune DyVM from it (token pruning + block selection)         (configs/seg/demo-dyvm.yaml)
#   3. evaluate both (mIoU/mAcc/aAcc by slide inference, MACs in both conventions, tokens kept, block keep ratio,
#      images/s of DyVM and of its dense twin in the same process)
#   4. write $OUT/report.md with a figure (predicted masks and the kept tokens over validation scenes)
# Under 10 minutes on 2 idle cores. OUT (default output/demo-seg) and extra `main.py seg` flags for every step can
# be given: OUT=/tmp/demo-seg bash scripts/demo-seg.sh --max-iters 20
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
command -v "$PYTHON" >/dev/null || PYTHON=python3
OUT=${OUT:-output/demo-seg}
# torch's OpenMP threads spin while waiting; on a small shared CPU that makes a busy machine 10-20x slower.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
start=$(date +%s)
rm -rf "$OUT/dense" "$OUT/dyvm"
echo "== 1/4 dense Vim segmenter on the embedded scenes"
"$PYTHON" main.py seg --config configs/seg/demo-dense.yaml --output_dir "$OUT/dense" "$@"
echo "== 2/4 DyVM fine-tuned from it"
"$PYTHON" main.py seg --config configs/seg/demo-dyvm.yaml --model-path "$OUT/dense/checkpoint.pth" \
    --output_dir "$OUT/dyvm" "$@"
echo "== 3/4 evaluation"
"$PYTHON" main.py seg --config configs/seg/demo-dense.yaml --model-path "$OUT/dense/checkpoint.pth" --eval \
    --output_dir "$OUT/dense" "$@"
"$PYTHON" main.py seg --config configs/seg/demo-dyvm.yaml --model-path "$OUT/dyvm/checkpoint.pth" --eval \
    --output_dir "$OUT/dyvm" "$@"
echo "== 4/4 report"
"$PYTHON" -m dyvm.seg.report --dense "$OUT/dense" --dyvm "$OUT/dyvm" --out "$OUT" \
    --wall-clock-s $(( $(date +%s) - start ))
