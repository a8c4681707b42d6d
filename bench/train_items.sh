#!/usr/bin/env bash
# Next-item recommendation on MovieLens-1M end to end: train the ml-1m preset (full softmax
# cross-entropy, 60 minutes) and the same preset with SASRec's binary cross-entropy (one sampled
# negative per position, same budget), then score both on the test items with `qkv evaluate`:
# HR@10 and NDCG@10 under full ranking and against 100 sampled negatives, beside the
# most-popular baseline; and draw why one history gets its recommendations.
#
#   bench/train_items.sh            # both losses
#   bench/train_items.sh ce         # one of them (ce or bce)
#
# Output in bench/runs/ml-1m-<loss>/ (train.log, evaluate.txt, explain/). Resumable: a killed
# training continues with --resume when the script is run again. Nothing else may run on the
# machine meanwhile: the budget is minutes, so sharing the cores means fewer steps.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/train_once.sh
QKV=.venv/bin/qkv
losses=("${@:-ce bce}")
for loss in ${losses[@]}; do
  out=bench/runs/ml-1m-$loss
  train_once "$out" --preset ml-1m --item-loss "$loss"
  $QKV evaluate --model "$out" --split test 2>&1 | tee "$out/evaluate.txt"
done
# the first user's test history, its last 30 items: what the model recommends and why
out=bench/runs/ml-1m-${losses[0]}
history=$(zcat "${QKV_DATA:-../shared/data}/ml-1m/ml-1m.txt.gz" | awk '$1 == 1 {print $2}' | head -n -1 | tail -n 30 | tr '\n' ' ')
$QKV recommend --model "$out" $history --k 10 --explain "$out/explain" | tee "$out/recommend.txt"
