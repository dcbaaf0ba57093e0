#!/usr/bin/env bash
# On the GPU machine: build the upstream CUDA extensions (causal-conv1d 1.7.0, mamba-ssm 2.3.2.post1) for
# sm_90 only, in place in .upstream/src (prepared by benchmarks/kernels_upstream_prepare.sh and carried
# with the call), or reuse the compressed .so parts an earlier call brought back, carried in
# .upstream/built. Prints the PYTHONPATH under which the upstream packages import (their names clash with ours: use it in a process
# of its own). Puts freshly built extensions into $OUT (stripped, gzipped, split) for later calls to carry.
#   usage (repo root): UPSTREAM_PATH=$(bash benchmarks/kernels_upstream_build.sh)
set -euo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SRC=$(pwd)/.upstream/src
CONV_SRC=$SRC/causal_conv1d-1.7.0 SCAN_SRC=$SRC/mamba_ssm-2.3.2.post1  # not CC: torch reads CC as the host compiler
t0=$(date +%s)
build() {  # $1 source folder, $2 extension name: unpack the carried parts, or build and bring back parts
  local log=/tmp/build_$(basename "$1").log parts
  parts=$(ls .upstream/built/$2*.gz.part* 2>/dev/null | sort) || true  # none carried: build
  if [ -n "$parts" ]; then
    cat $parts | gunzip > "$1/$(basename "${parts%%$'\n'*}" | sed 's/\.gz\.part.*//')"
    echo "upstream: reusing the carried $2" >&2
    return 0
  fi
  (cd "$1" && CAUSAL_CONV1D_FORCE_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-16} \
    python3 setup.py build_ext --inplace) > "$log" 2>&1 \
    || { cp "$log" "$OUT/"; tail -30 "$log" >&2; echo "upstream build failed: $1" >&2; return 1; }
  echo "upstream: built $(basename "$1") after $(( $(date +%s) - t0 )) s" >&2
  # stripped and gzipped, in parts under 16 MiB: what $OUT can bring back (carry them as .upstream/built;
  # both together pass the 64 MiB a call can carry: about 23 + 37 MB)
  strip --strip-unneeded -o "/tmp/$2.so" "$1"/$2*.so
  gzip -9 -c "/tmp/$2.so" | split -b 15M -d - "$OUT/$(basename "$1"/$2*.so).gz.part"
}
# Both at once: causal-conv1d is 4 slow compile units (about 6.5 min), mamba-ssm 10 shorter ones (2.5 min).
build "$CONV_SRC" causal_conv1d_cuda & conv=$!
build "$SCAN_SRC" selective_scan_cuda & scan=$!
wait $conv || exit 1
wait $scan || exit 1
echo "$CONV_SRC:$SCAN_SRC"
