#!/usr/bin/env bash
# Run `qkv probe` (200 validation sentences) and `qkv explain` on a trained Multi30k model and time
# them. Usage: bench/probe_multi30k.sh MODEL_DIR OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1 out=$2
mkdir -p "$out"
start=$(date +%s)
.venv/bin/qkv probe --model "$model" --out "$out/probe" --sentences 200 2>&1 | tee "$out/probe.log"
echo "probe wall time: $(( $(date +%s) - start )) s" | tee -a "$out/probe.log"
.venv/bin/qkv explain --model "$model" "Ein Mann fährt Fahrrad." --out "$out/explain" --json
.venv/bin/qkv explain --model "$model" "Zwei junge Frauen spielen Fußball auf einem Feld." \
    --beam 5 --out "$out/explain-beam5"
echo "Ein Mann fährt Fahrrad." | .venv/bin/qkv translate --model "$model" --beam 5 --nbest 3 \
    --trace "$out/beam_trace.html"
