#!/usr/bin/env bash
# The whole GPU story in under 8 minutes, on a machine with CUDA (after ./setup.sh; Multi30k in
# ../shared/data or $QKV_DATA):
#   1. bench/gpu_check.py: the stack's invariants on the GPU (decoding, search, inspection, a
#      few training steps in bf16), about 1 minute;
#   2. bench/gpu_train.py: the multi30k-de-en preset in bf16 for 5 minutes: target tokens/s, time
#      to the CPU run's best validation BLEU, an MFU estimate, peak memory.
# Everything lands in $OUT (default bench/runs/gpu): gpu.txt, gpu_check.txt, train.log,
# gpu_train.json.
#   bench/gpu.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/runs/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
.venv/bin/python bench/gpu_check.py 2>&1 | tee "$OUT/gpu_check.txt"
rm -rf "$OUT/run"
.venv/bin/python bench/gpu_train.py --out "$OUT" --minutes 5 2>&1 | tee "$OUT/train.log"
