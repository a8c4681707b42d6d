#!/usr/bin/env bash
# Issue 17's speed rows on a CPU with bf16 units, alone on the machine: training (qkv bf16
# against qkv fp32 and against HF Marian and nn.Transformer under the same autocast, and the fp32
# table again), translation (qkv fp32 / int8 / bf16 against CTranslate2's compute types), and
# the loss and page-fault measurements behind them. About 35 minutes on 2 cores.
# Usage: bench/bf16_speed.sh [OUT]     (default bench/runs/bf16_speed; THREADS=2 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/runs/bf16_speed}
t=${THREADS:-2}
py=.venv/bin/python
mkdir -p "$out"
lscpu | grep -E "Model name|^Flags" > "$out/cpu.txt"
$py bench/loss_speed.py --threads "$t" --precision fp32 --chunks 32,64,131,256,512 | tee "$out/loss_fp32.txt"
$py bench/loss_speed.py --threads "$t" --precision bf16 --chunks 32,64,131,256,512 | tee "$out/loss_bf16.txt"
$py bench/page_faults.py --threads "$t" | tee "$out/page_faults.txt"
$py bench/train_speed.py --threads "$t" --size small --precision bf16 | tee "$out/train_small_bf16.txt"
$py bench/train_speed.py --threads "$t" --size small | tee "$out/train_small_fp32.txt"
$py bench/train_speed.py --threads "$t" --size base --steps 4 --precision bf16 | tee "$out/train_base_bf16.txt"
$py bench/train_speed.py --threads "$t" --size base --steps 4 | tee "$out/train_base_fp32.txt"
$py bench/translate_speed.py --threads "$t" --size small --sentences 256 --repeats 2 | tee "$out/translate_small.txt"
$py bench/translate_speed.py --threads "$t" --size base --sentences 128 --repeats 2 | tee "$out/translate_base.txt"
# CTranslate2 ran slower at 2 threads than at 1 on the machine of 2026-11-30: both thread counts
$py bench/translate_speed.py --threads 1 --size small --sentences 256 --repeats 2 | tee "$out/translate_small_1thread.txt"
$py bench/translate_speed.py --threads 1 --size base --sentences 64 --repeats 2 | tee "$out/translate_base_1thread.txt"
$py bench/ct2_threads.py | tee "$out/ct2_threads_default.txt"
$py bench/ct2_threads.py --wait-policy ACTIVE | tee "$out/ct2_threads_ACTIVE.txt"
