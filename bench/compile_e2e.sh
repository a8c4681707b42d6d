#!/usr/bin/env bash
# qkv evaluate on the Multi30k test set, eager and --compile twice over a fresh inductor cache:
# seconds for each, and whether the outputs are identical. Usage: bench/compile_e2e.sh
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 QKV_CACHE=/tmp/qkv-e2e-cache
rm -rf $QKV_CACHE
o=bench/runs/compile_e2e; mkdir -p $o
m=bench/runs/multi30k-de-en/averaged
for run in eager compiled1 compiled2; do
  flag=""; [ $run != eager ] && flag="--compile"
  s=$(date +%s.%N)
  .venv/bin/qkv evaluate --model $m --split test_2016_flickr --beam 5 $flag --output $o/$run.hyp > $o/$run.txt 2>$o/$run.err
  echo "$run $(echo "$(date +%s.%N) - $s" | bc) s $(sed -n 1p $o/$run.txt | sed 's/.*beam 5, //')"
done
cmp $o/eager.hyp $o/compiled1.hyp && cmp $o/eager.hyp $o/compiled2.hyp && echo identical
