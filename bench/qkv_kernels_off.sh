#!/usr/bin/env bash
# The qkv command with its training kernels of 2026-11-30 (attention with dropout, the fused
# dropouts, the bf16 norm) replaced by PyTorch's ops, everything else as usual; for A/B training
# runs against the kernels (bench/README.md, "Training kernels"), e.g.
#   QKV=bench/qkv_kernels_off.sh bench/train_budget.sh de en 3000 bench/runs/off --precision bf16
set -euo pipefail
exec "$(dirname "$0")/../.venv/bin/python" -c "
import sys
import qkv.native as native
native.train_attention = lambda *a: None
native.fused_dropouts = lambda: None
native.layer_norm_bf16 = lambda *a: None
from qkv.cli import main
sys.argv[0] = 'qkv'
sys.exit(main())
" "$@"
