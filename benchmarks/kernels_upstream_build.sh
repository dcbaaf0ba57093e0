#!/usr/bin/env bash
# On the GPU machine: build the upstream CUDA extensions (causal-conv1d 1.7.0, mamba-ssm 2.3.2.post1) for
# sm_90 only, in place in .upstream/src (prepared by benchmarks/kernels_upstream_prepare.sh and carried
# with the call), or reuse .so files carried back from an earlier call in .upstream/built. Prints the
# PYTHONPATH under which the upstream packages import (their names clash with ours: use it in a process
# of its own). Copies freshly built, stripped .so files to $OUT so later calls can carry them.
#   usage (repo root): UPSTREAM_PATH=$(bash benchmarks/kernels_upstream_build.sh)
set -euo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SRC=$(pwd)/.upstream/src
CONV_SRC=$SRC/causal_conv1d-1.7.0 SCAN_SRC=$SRC/mamba_ssm-2.3.2.post1  # not CC: torch reads CC as the host compiler
if ls .upstream/built/causal_conv1d_cuda*.so .upstream/built/selective_scan_cuda*.so >/dev/null 2>&1; then
  cp .upstream/built/causal_conv1d_cuda*.so "$CONV_SRC/"; cp .upstream/built/selective_scan_cuda*.so "$SCAN_SRC/"
  echo "upstream: reusing carried extensions" >&2
else
  t0=$(date +%s)
  for pkg in "$CONV_SRC" "$SCAN_SRC"; do  # one at a time: each gets all cores; a failure names its package
    (cd "$pkg" && CAUSAL_CONV1D_FORCE_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-16} \
      python3 setup.py build_ext --inplace) > "$OUT/build_$(basename "$pkg").log" 2>&1 \
      || { tail -30 "$OUT/build_$(basename "$pkg").log" >&2; echo "upstream build failed: $pkg" >&2; exit 1; }
    echo "upstream: built $(basename "$pkg") after $(( $(date +%s) - t0 )) s" >&2
  done
  for f in "$CONV_SRC"/causal_conv1d_cuda*.so "$SCAN_SRC"/selective_scan_cuda*.so; do
    strip --strip-debug -o "$OUT/$(basename "$f")" "$f"
  done
fi
echo "$CONV_SRC:$SCAN_SRC"
