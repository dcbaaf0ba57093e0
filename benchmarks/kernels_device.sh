#!/usr/bin/env bash
# One device call: ours and upstream timed in the same run, merged into one table. Everything lands in $OUT.
# Needs .upstream carried with the call (benchmarks/kernels_upstream_prepare.sh makes it; .upstream/built
# holds the compressed extensions an earlier call brought back, if any). Without them the upstream build
# (about 7.5 min on 16 cores) runs in the background, on 12 cores, while ours is checked and timed; the GPU
# timings of ours are GPU-bound at these shapes, but compare the runs of a table made that way with care.
#   usage (repo root, on the GPU machine): bash benchmarks/kernels_device.sh [extra args for kernels.py]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ROOT=$(pwd)
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv
MAX_JOBS=12 nice -n 10 bash benchmarks/kernels_upstream_build.sh > /tmp/upstream_path 2> "$OUT/upstream_build.txt" &
BUILD=$!
PYTHONPATH=$ROOT/mamba-1p1p1:$ROOT timeout ${OURS_TIMEOUT:-480} python3 benchmarks/kernels.py --out "$OUT/ours.json" "$@" \
  2>&1 | tee "$OUT/ours.log"
wait $BUILD && (cd /tmp && PYTHONPATH=$(cat /tmp/upstream_path) python3 "$ROOT/benchmarks/kernels.py" --upstream-only \
  --out "$OUT/upstream.json") 2>&1 | tee "$OUT/upstream.log"
cat "$OUT/upstream_build.txt"
PYTHONPATH=$ROOT/mamba-1p1p1:$ROOT python3 benchmarks/kernels.py --table-only --merge "$OUT/ours.json" \
  "$OUT/upstream.json" --out "$OUT/merged.json"
