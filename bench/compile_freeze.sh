#!/usr/bin/env bash
# Compiled fixed-shape decoding with frozen weights (constants of the graph, packed by inductor)
# against weights as graph inputs: compile time of a first and a second process over one
# on-disk cache, and speed against the packed eager step in the same process.
# Usage: bench/compile_freeze.sh [THREADS]  (runs in a fresh cache dir under /tmp)
set -euo pipefail
cd "$(dirname "$0")"
threads=${1:-2}
export QKV_CACHE=$(mktemp -d /tmp/qkv-compile-freeze-XXXX)
for strategy in greedy beam; do
    for run in first second; do
        for freeze in "" "--no-freeze"; do
            echo "== $strategy, ${freeze:---freeze}, $run process"
            ../.venv/bin/python fixed_decode.py --size small --strategy $strategy --threads "$threads" \
                --repeats 2 --sentences 128 $freeze 2>&1 | grep -E "compil|sentences/s"
        done
    done
done
