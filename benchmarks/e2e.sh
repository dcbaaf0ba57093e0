#!/usr/bin/env bash
# End-to-end inference throughput on one GPU: dense Vim and DyVM, Tiny/Small/Base, batch 128, fp32 and bf16 autocast,
# with the untrained DyVM's gates calibrated to the authors' realised block keep ratio (--block-keep-ratio authors: 0.735, varying
# per image)
# and token keep 0.7. Prints card / date / torch / triton, a table and the DyVM/dense ratios; writes JSON.
#   bash benchmarks/e2e.sh            (results in benchmarks/e2e_results.json; copy the table into docs/results.md)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -m dyvm.benchmark --models vim_tiny dyvm_vim_tiny vim_small dyvm_vim_small vim_base dyvm_vim_base \
    --batch-sizes ${BATCH_SIZES:-128} --dtypes fp32 bf16 --block-keep-ratio ${BLOCK_KEEP_RATIO:-authors} --token-keep-ratio 0.7 \
    --warmup 10 --iters 30 --json ${JSON:-benchmarks/e2e_results.json} "$@"
