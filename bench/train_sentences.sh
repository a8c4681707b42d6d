#!/usr/bin/env bash
# The encoder tasks end to end: train the sst2 and stsb presets for their budgets, score them
# with `qkv evaluate`, then put them beside the TF-IDF baselines and the zero-shot encoders of
# the Multi30k translation models (if bench/runs has them) in one run of
# bench/sentence_baselines.py, and time `qkv search`'s code over 100,000 sentences.
#
#   bench/train_sentences.sh            # both tasks
#   bench/train_sentences.sh sst2       # one of them
#
# Output in bench/runs/<task>/ (train.log, evaluate.txt); the comparison in
# bench/runs/sentences.json and bench/runs/search_speed.json. Resumable: a killed training
# continues with --resume when the script is run again.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/train_once.sh
QKV=.venv/bin/qkv
PY=.venv/bin/python
tasks=("${@:-sst2 stsb}")
for task in ${tasks[@]}; do
  out=bench/runs/$task
  train_once "$out" --preset "$task"
  plot=(); [ "$task" = sst2 ] && plot=(--plot "$out/confusion.png")
  $QKV evaluate --model "$out" "${plot[@]}" 2>&1 | tee "$out/evaluate.txt"
done
zero_shot=()
for d in bench/runs/multi30k-de-en/averaged bench/runs/multi30k-en-de/averaged; do
  [ -d "$d" ] && zero_shot+=("$d")
done
args=()
[ -d bench/runs/sst2/best ] && args+=(--sst2 bench/runs/sst2)
[ -d bench/runs/stsb/best ] && args+=(--stsb bench/runs/stsb)
$PY bench/sentence_baselines.py "${args[@]}" --zero-shot "${zero_shot[@]}" \
  --json bench/runs/sentences.json
if [ -d bench/runs/stsb/best ]; then
  $PY bench/search_speed.py --model bench/runs/stsb --json bench/runs/search_speed.json
fi
