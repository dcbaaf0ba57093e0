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
if ls .upstream/built/causal_conv1d_cuda*.gz* .upstream/built/selective_scan_cuda*.gz* >/dev/null 2>&1; then
  for name in causal_conv1d_cuda selective_scan_cuda; do  # parts (split to fit $OUT's 16 MiB per file)
    so=$(ls .upstream/built/$name*.gz* | head -1 | sed 's/\.gz.*//; s#.*/##')
    dest=$([ $name = causal_conv1d_cuda ] && echo "$CONV_SRC" || echo "$SCAN_SRC")
    cat $(ls .upstream/built/$name*.gz* | sort) | gunzip > "$dest/$so"
  done
  echo "upstream: reusing carried extensions" >&2
else
  t0=$(date +%s)
  build() {  # a failure names its package and shows its log's tail
    local log=/tmp/build_$(basename "$1").log
    (cd "$1" && CAUSAL_CONV1D_FORCE_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-16} \
      python3 setup.py build_ext --inplace) > "$log" 2>&1 \
      || { cp "$log" "$OUT/"; tail -30 "$log" >&2; echo "upstream build failed: $1" >&2; return 1; }
    echo "upstream: built $(basename "$1") after $(( $(date +%s) - t0 )) s" >&2
  }
  # Both at once: causal-conv1d is 4 slow compile units (about 5.5 min), mamba-ssm 10 shorter ones.
  build "$CONV_SRC" & conv=$!
  build "$SCAN_SRC" & scan=$!
  wait $conv || exit 1
  wait $scan || exit 1
  for f in "$CONV_SRC"/causal_conv1d_cuda*.so "$SCAN_SRC"/selective_scan_cuda*.so; do
    # stripped and compressed, in parts under 16 MiB: what $OUT can bring back (carry them as .upstream/built)
    strip --strip-unneeded -o /tmp/$(basename "$f") "$f"
    gzip -9 -c /tmp/$(basename "$f") | split -b 15M -d - "$OUT/$(basename "$f").gz.part"
  done
fi
echo "$CONV_SRC:$SCAN_SRC"
