#!/usr/bin/env bash
# One device call: build (or reuse) the upstream extensions, time them in their own process (the package
# names clash with ours), then check and time ours, and print the merged table. Everything lands in $OUT.
# Needs .upstream (benchmarks/kernels_upstream_prepare.sh; .upstream/built holds .so files carried back
# from an earlier call, if any) carried with the call.
#   usage (repo root, on the GPU machine): bash benchmarks/kernels_device.sh [extra args for kernels.py]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ROOT=$(pwd)
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv
UPSTREAM_PATH=$(bash benchmarks/kernels_upstream_build.sh) || exit 1
(cd /tmp && PYTHONPATH=$UPSTREAM_PATH python3 "$ROOT/benchmarks/kernels.py" --upstream-only --out "$OUT/upstream.json") \
  2>&1 | tee "$OUT/upstream.log"
PYTHONPATH=$ROOT/mamba-1p1p1:$ROOT python3 benchmarks/kernels.py --out "$OUT/ours.json" "$@" 2>&1 | tee "$OUT/ours.log"
PYTHONPATH=$ROOT/mamba-1p1p1:$ROOT python3 benchmarks/kernels.py --table-only --merge "$OUT/ours.json" \
  "$OUT/upstream.json" --out "$OUT/merged.json"
