#!/usr/bin/env bash
# The qkv command with its training kernels of 2026-11-30 (attention with dropout, the fused
# dropouts, the bf16 norm) replaced by PyTorch's ops, everything else as usual; for A/B training
# runs against the kernels (bench/README.md, "Training kernels"), e.g.
#   QKV=bench/qkv_kernels_off.sh bench/train_budget.sh de en 3000 bench/runs/off --precision bf16
set -euo pipefail
exec "$(dirname "$0")/../.venv/bin/python" -c "
import sys
import qkv.native as native
from qkv.cli import main
sys.argv[0] = 'qkv'
with native.off(*native.TRAINING_KERNELS):
    code = main()
sys.exit(code)
" "$@"
