# Sourced by the bench/train_*.sh scripts: train one run directory to the end, resumably.
#   train_once OUT FLAGS...   done already: nothing; a killed run in OUT: --resume; else a fresh
#                             `qkv train FLAGS... --out OUT`. Marks OUT/DONE at the end.
train_once() {
  local out=$1; shift
  if [ -f "$out/DONE" ]; then
    echo "$out: done already"
  elif [ -d "$out/last" ]; then
    .venv/bin/qkv train --out "$out" --resume 2>&1 | tee -a "$out/train.log"
  else
    mkdir -p "$out"
    .venv/bin/qkv train "$@" --out "$out" --overwrite 2>&1 | tee "$out/train.log"
  fi
  touch "$out/DONE"
}
