#!/usr/bin/env bash
# Fetches the upstream sdists (mamba-ssm 2.3.2.post1, causal-conv1d 1.7.0) into .upstream/ (git-ignored)
# and unpacks them into .upstream/src with setup.py patched to build for sm_90 only, for
# benchmarks/kernels_device.sh (carry .upstream with the device call).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
"$PYTHON" -m pip download --no-deps --no-binary :all: --no-build-isolation -d .upstream \
  mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0
rm -rf .upstream/src && mkdir -p .upstream/src
tar xzf .upstream/mamba_ssm-2.3.2.post1.tar.gz -C .upstream/src
tar xzf .upstream/causal_conv1d-1.7.0.tar.gz -C .upstream/src
for f in .upstream/src/*/setup.py; do
  "$PYTHON" - "$f" <<'PY'
import sys
path = sys.argv[1]
text = open(path).read()
# cc_flag must be replaced before extra_compile_args is built from it (the block that follows the arch
# list starts with the FORCE_CXX11_ABI test in both setup.py files).
anchor = "    if FORCE_CXX11_ABI:\n"
assert text.count(anchor) == 1, f"unexpected setup.py layout in {path}"
text = text.replace(anchor, '    cc_flag = ["-gencode", "arch=compute_90,code=sm_90"]  # sm_90 only\n' + anchor)
open(path, "w").write(text)
PY
done
echo "ready: $(ls .upstream/src)"
