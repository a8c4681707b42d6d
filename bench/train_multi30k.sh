#!/usr/bin/env bash
# Train the default Multi30k preset from scratch on this machine and score it on test_2016_flickr.
# Usage: bench/train_multi30k.sh SRC TGT MINUTES [OUT] [extra qkv train flags...]
#   e.g. bench/train_multi30k.sh de en 90
# The preset's recipe before 2026-11-29 (the runs of 2026-11-28/29 in bench/README.md):
#   bench/train_multi30k.sh de en 80 bench/runs/multi30k-de-en --lr 1e-3 --schedule inverse_sqrt \
#       --max-steps 0 --eval-every 400 --average-last 3 --tune-alphas none
# Resumes if OUT already holds a run. Writes OUT/train.log, OUT/metrics.jsonl, OUT/test_*.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$1 tgt=$2 minutes=$3
out=${4:-bench/runs/multi30k-$src-$tgt}
shift $(($# < 4 ? $# : 4))
mkdir -p "$out"
if [ -f "$out/last/trainer.json" ]; then
    .venv/bin/qkv train --out "$out" --resume --max-minutes "$minutes" 2>&1 | tee -a "$out/train.log"
else
    .venv/bin/qkv train --preset "multi30k-$src-$tgt" --out "$out" --overwrite \
        --max-minutes "$minutes" "$@" 2>&1 | tee "$out/train.log"
fi
for model in best averaged; do
    [ -d "$out/$model" ] || continue
    for mode in "--beam 5" "--greedy"; do
        name=$(echo "$mode" | tr -d ' -')
        .venv/bin/qkv evaluate --model "$out/$model" --split test_2016_flickr $mode \
            --output "$out/test_${model}_$name.hyp" | tee "$out/test_${model}_$name.txt"
    done
done
.venv/bin/python bench/curve.py "$out"
