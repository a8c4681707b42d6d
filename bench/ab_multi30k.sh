#!/usr/bin/env bash
# This tree's decoding against another commit's on real data: a trained Multi30k model on
# test_2016_flickr (1,000 sentences), beam 5 and greedy (`--beam 1`), 1 and 2 threads, each
# pair run in separate processes, alternated twice; sentences/s, BLEU, and whether the
# translations are identical. The other commit is checked out with `git worktree` and runs
# with this venv. Flags after the third argument go to `qkv evaluate`.
#
#   bench/ab_multi30k.sh OLD_REV MODEL_DIR OUT_DIR [qkv evaluate flags...]
#   bench/ab_multi30k.sh 5c8a645 bench/runs/prec-bf16-de-en/averaged bench/runs/t1204
#   bench/ab_multi30k.sh 5c8a645 bench/runs/prec-bf16-de-en/averaged bench/runs/t1204/fp32 \
#     --precision fp32
set -euo pipefail
old_rev=$1 model=$(realpath "$2") out=$3
shift 3
here=$(pwd) py=$(pwd)/.venv/bin/python
old=$(mktemp -d /tmp/qkv-old.XXXX)
git worktree add --detach "$old" "$old_rev" >/dev/null
trap 'git -C "$here" worktree remove --force "$old"' EXIT
mkdir -p "$out"
export QKV_DATA=${QKV_DATA:-$(realpath ../shared/data)}
run() {  # tree threads beam name [flags]
  local tree=$1 threads=$2 beam=$3 name=$4
  shift 4
  (cd "$tree" && OMP_NUM_THREADS=$threads "$py" -m qkv evaluate --model "$model" \
    --beam "$beam" --output "$here/$out/$name.hyp" "$@")
}
for side in "$here" "$old"; do run "$side" 2 1 warm "$@" >/dev/null 2>&1 || true; done  # builds
for threads in 1 2; do
  for beam in 5 1; do
    new=new_t${threads}_b${beam} old_name=old_t${threads}_b${beam}
    for rep in 1 2; do
      echo "threads $threads beam $beam rep $rep new:"
      run "$here" "$threads" "$beam" "$new" "$@" 2>&1 | grep -v "^qkv:"
      echo "threads $threads beam $beam rep $rep old ($old_rev):"
      run "$old" "$threads" "$beam" "$old_name" "$@" 2>&1 | grep -v "^qkv:"
    done
    if cmp -s "$out/$new.hyp" "$out/$old_name.hyp"; then
      echo "identical outputs"
    else
      echo "outputs differ in $(diff "$out/$new.hyp" "$out/$old_name.hyp" | grep -c '^<') sentences"
    fi
  done
done
