#!/usr/bin/env bash
# The length penalty chosen on the validation set (`qkv tune`, beam 5, alphas 0.6-2.0) against
# the fixed 0.6 used before, each scored on the test split with beam 5.
# Usage: bench/length_penalty.sh MODEL_DIR [MODEL_DIR ...]    (THREADS=1: one thread)
#   e.g. bench/length_penalty.sh bench/runs/budget-de-en-d01/averaged bench/runs/multi30k-en-de/best
# Writes decoding.json into each model directory (as training a preset now does).
set -euo pipefail
cd "$(dirname "$0")/.."
qkv=${QKV:-.venv/bin/qkv}
[ -n "${THREADS:-}" ] && export OMP_NUM_THREADS=$THREADS
for model in "$@"; do
    echo "== $model"
    $qkv tune --model "$model"
    echo "-- test, alpha 0.6 (the old default)"
    $qkv evaluate --model "$model" --beam 5 --alpha 0.6 --show 0
    echo "-- test, the tuned alpha"
    $qkv evaluate --model "$model" --beam 5 --show 0
done
