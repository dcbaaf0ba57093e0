#!/usr/bin/env bash
# One device call: ours and upstream checked and timed in the same run, one after the other (nothing else
# loads the machine while either is timed), merged into one table. Everything lands in $OUT.
# Needs .upstream carried with the call (benchmarks/kernels_upstream_prepare.sh makes it). Extensions that an
# earlier call brought back (.upstream/built: compressed parts) are reused, the others built first: about
# 2.5 min for mamba-ssm, 6.5 min for causal-conv1d (both in parallel when neither was carried).
#   usage (repo root, on the GPU machine): bash benchmarks/kernels_device.sh [extra args for kernels.py]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ROOT=$(pwd)
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv
UPSTREAM_PATH=$(bash benchmarks/kernels_upstream_build.sh) || exit 1
PYTHONPATH=$ROOT/mamba-1p1p1:$ROOT timeout ${OURS_TIMEOUT:-480} python3 benchmarks/kernels.py --out "$OUT/ours.json" "$@" \
  > "$OUT/ours.log" 2>&1; tail -3 "$OUT/ours.log"
(cd /tmp && PYTHONPATH=$UPSTREAM_PATH python3 "$ROOT/benchmarks/kernels.py" --upstream-only --out "$OUT/upstream.json") \
  > "$OUT/upstream.log" 2>&1; tail -3 "$OUT/upstream.log"
PYTHONPATH=$ROOT/mamba-1p1p1:$ROOT python3 benchmarks/kernels.py --table-only --merge "$OUT/ours.json" \
  "$OUT/upstream.json" --out "$OUT/merged.json"
