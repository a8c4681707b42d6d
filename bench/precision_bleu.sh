#!/usr/bin/env bash
# BLEU of bf16 inference against fp32 on the same model (qkv/precision.py): Multi30k
# test_2016_flickr, beam 5 and greedy, outputs kept for comparing line by line.
# Usage: bench/precision_bleu.sh [MODEL] [OUT]   (default: the De->En preset run's average)
# On a CPU without bf16 units bf16 is emulated: slow, but the arithmetic (and BLEU) is bf16's.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-bench/runs/multi30k-de-en/averaged}
out=${2:-bench/runs/bf16}
mkdir -p "$out"
for mode in "--beam 5" "--greedy"; do
    name=$(echo "$mode" | tr -d ' -')
    for p in fp32 bf16; do
        start=$(date +%s.%N)
        .venv/bin/qkv evaluate --model "$model" --split test_2016_flickr $mode --precision $p \
            --output "$out/test_${p}_$name.hyp" > "$out/test_${p}_$name.txt"
        echo "$p $name: $(sed -n 2p "$out/test_${p}_$name.txt" | cut -d' ' -f1-2)," \
            "$(echo "$(date +%s.%N) - $start" | bc) s"
    done
    same=$(paste -d'\t' "$out/test_fp32_$name.hyp" "$out/test_bf16_$name.hyp" | awk -F'\t' '$1==$2' | wc -l)
    echo "$name: $same of $(wc -l < "$out/test_fp32_$name.hyp") outputs identical"
done
