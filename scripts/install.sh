#!/usr/bin/env bash
# Installs everything into the active Python environment (make and activate a venv first if you like):
#   torch + torchvision, timm and friends, the local packages causal_conv1d, mamba_ssm and dyvm (editable),
#   and the embedded demo dataset. No compile step anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -m pip install -r requirements.txt
# animal-mnist declares tensorflow as a dependency but its data files need nothing: install it alone.
"$PYTHON" -m pip install --no-deps animal-mnist==0.4
"$PYTHON" -c "import torch, timm, dyvm, mamba_ssm, causal_conv1d; print('installed: torch', torch.__version__, '| timm', timm.__version__)"
