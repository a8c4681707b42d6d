#!/usr/bin/env bash
# English paraphrases by back-translation: every English Multi30k training caption translated to
# German by the En→De model and back by the De→En model (greedy), kept where the round trip
# changed the wording. Output: bench/runs/paraphrases.tsv (caption<TAB>paraphrase), for
#   qkv train --preset stsb --paraphrase-tsv bench/runs/paraphrases.tsv
# Needs bench/runs/multi30k-en-de and multi30k-de-en (bench/train_multi30k.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
QKV=.venv/bin/qkv
data=${QKV_DATA:-../shared/data}
out=bench/runs
zcat "$data/multi30k/train.en.gz" > $out/captions.en
$QKV translate --model $out/multi30k-en-de/averaged --greedy --input $out/captions.en --output $out/captions.de
$QKV translate --model $out/multi30k-de-en/averaged --greedy --input $out/captions.de --output $out/captions.back.en
paste $out/captions.en $out/captions.back.en | awk -F'\t' '$1 != $2 && $2 != ""' > $out/paraphrases.tsv
wc -l $out/captions.en $out/paraphrases.tsv
