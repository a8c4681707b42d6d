#!/usr/bin/env bash
# English -> Chinese, the explainers' example: the tatoeba-en-zh preset (8 heads) and the same
# model with one head per layer, trained side by side for the same minutes (one thread each, so
# neither takes the other's core), then scored on the held-out test split (BLEU with
# sacreBLEU's zh tokenizer, and chrF) greedy and with beam 5, the output checked for <unk>, and
# the heads' diversity measured on validation sentences (bench/head_diversity.py).
#
#   bench/train_zh.sh                 # 25 minutes each (both at once)
#   MINUTES=5 bench/train_zh.sh       # a shorter run
#
# Output in bench/runs/tatoeba-en-zh{,-1head}/ (train.log, evaluate-*.txt). Resumable: a killed
# training continues with --resume when the script is run again.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/train_once.sh
QKV=.venv/bin/qkv
minutes=${MINUTES:-25}
train_once bench/runs/tatoeba-en-zh --preset tatoeba-en-zh --threads 1 --max-minutes "$minutes" \
  > /dev/null &
train_once bench/runs/tatoeba-en-zh-1head --preset tatoeba-en-zh --n-heads 1 --threads 1 \
  --max-minutes "$minutes" > /dev/null &
wait
for run in tatoeba-en-zh tatoeba-en-zh-1head; do
  out=bench/runs/$run
  $QKV evaluate --model "$out" --greedy --output "$out/test-greedy.zh" 2>&1 | tee "$out/evaluate-greedy.txt"
  $QKV evaluate --model "$out" --beam 5 --output "$out/test-beam5.zh" 2>&1 | tee "$out/evaluate-beam5.txt"
done
for run in tatoeba-en-zh tatoeba-en-zh-1head; do
  echo "$run: <unk> in the test outputs: $(cat bench/runs/$run/test-*.zh | grep -o '<unk>' | wc -l)"
done
