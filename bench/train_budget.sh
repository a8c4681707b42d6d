#!/usr/bin/env bash
# The Multi30k recipe at a fixed budget of updates (issue #17's "quality per training minute"):
# the preset with a cosine decay to zero at the last update, more dropout and more checkpoints
# averaged, then the test scores of best/ and averaged/ (beam 5 and greedy, alpha 0.6: the
# length penalty is left untuned here; bench/length_penalty.sh tunes it). The defaults are the
# recipe of the first such runs (peak 1e-3, dropout 0.2); later flags override them.
# Usage: bench/train_budget.sh SRC TGT [STEPS] [OUT] [extra qkv train flags...]
#   e.g. bench/train_budget.sh de en 3000
# Resumes if OUT already holds a run. THREADS=1 to run two side by side on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$1 tgt=$2 steps=${3:-3000}
out=${4:-bench/runs/budget-$src-$tgt}
shift $(($# < 4 ? $# : 4))
qkv=${QKV:-.venv/bin/qkv}
mkdir -p "$out"
if [ -f "$out/last/trainer.json" ]; then
    $qkv train --out "$out" --resume --threads "${THREADS:-0}" 2>&1 | tee -a "$out/train.log"
else
    $qkv train --preset "multi30k-$src-$tgt" --out "$out" --overwrite \
        --max-steps "$steps" --max-minutes 0 --threads "${THREADS:-0}" \
        --schedule cosine --min-lr 0 --lr 1e-3 --dropout 0.2 --eval-every 200 --average-last 5 \
        --tune-alphas none "$@" 2>&1 | tee "$out/train.log"
fi
for model in best averaged; do
    [ -d "$out/$model" ] || continue
    for mode in "--beam 5" "--greedy"; do
        name=$(echo "$mode" | tr -d ' -')
        $qkv evaluate --model "$out/$model" --split test_2016_flickr $mode \
            --output "$out/test_${model}_$name.hyp" | tee "$out/test_${model}_$name.txt"
    done
done
.venv/bin/python bench/curve.py "$out"
