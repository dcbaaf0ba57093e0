#!/usr/bin/env bash
# One device call: build (or unpack) the upstream kernels in the background, check and time ours
# meanwhile, then time upstream in its own process and print the merged table. Logs and results go to
# $OUT; freshly built upstream extensions too (carry them back as .upstream/built next time).
# Needs .upstream/src (the two sdists unpacked, setup.py patched to build for sm_90 only; see docs/kernels.md)
# carried with the call. The build alone takes about 7.5 minutes on 16 cores: more than one call's
# limit once our benchmark shares the cores, so build in one call (bring the .so files back) and time in the next.
#   usage (repo root, on the GPU machine): bash benchmarks/kernels_device.sh [extra args for kernels.py]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ROOT=$(pwd); UP=/tmp/up; mkdir -p $UP
export PYTHONUNBUFFERED=1
build_upstream() {
  if ls .upstream/built/*.so >/dev/null 2>&1; then
    cp -r .upstream/src/mamba_ssm-2.3.2.post1/mamba_ssm .upstream/src/causal_conv1d-1.7.0/causal_conv1d $UP/
    cp .upstream/built/*.so $UP/
  else
    (cd .upstream/src && MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE TORCH_CUDA_ARCH_LIST=9.0 \
      MAX_JOBS=${MAX_JOBS:-16} python3 -m pip install -q --no-build-isolation --no-deps --no-index --target $UP \
      ./causal_conv1d-1.7.0 ./mamba_ssm-2.3.2.post1) > "$OUT/upstream_build.log" 2>&1
    for f in $UP/*.so; do strip --strip-debug -o "$OUT/$(basename $f)" "$f" || cp "$f" "$OUT/"; done
  fi
  echo "upstream ready: $(ls $UP/*.so | xargs -n1 basename | tr '\n' ' ')"
}
t0=$(date +%s)
build_upstream & BUILD_PID=$!
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv
PYTHONPATH=$ROOT/mamba-1p1p1:$ROOT python3 benchmarks/kernels.py --out "$OUT/ours.json" "$@" 2>&1 | tee "$OUT/ours.log"
wait $BUILD_PID; echo "build/unpack done after $(( $(date +%s) - t0 )) s"
(cd /tmp && PYTHONPATH=$UP python3 "$ROOT/benchmarks/kernels.py" --upstream-only --out "$OUT/upstream.json") \
  > "$OUT/upstream.log" 2>&1 || tail -20 "$OUT/upstream.log"
PYTHONPATH=$ROOT/mamba-1p1p1:$ROOT python3 benchmarks/kernels.py --table-only --merge "$OUT/ours.json" \
  "$OUT/upstream.json" --out "$OUT/merged.json" 2>&1 | tail -40
