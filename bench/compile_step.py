"""The training step compiled (torch.compile, inductor, dynamic shapes: Multi30k's token
batches vary in sentences and length) against the eager step qkv trains with, the small
Multi30k model on real 2,048-token batches, alternated in one process; the first compiled
steps (the compile) timed apart. (bench/compile_train.py, the earlier try, compiled the whole
loss module, the fused loss's custom backward included, on synthetic batches, one pass.)

    .venv/bin/python bench/compile_step.py --precision bf16
"""

import argparse
import time

import torch
from profile_train import training_step
from timing import tokens_per_s

from qkv.allocator import keep_freed_memory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    bf16 = args.precision == "bf16"
    eager, data = training_step(bf16, 16)
    compiled, _ = training_step(bf16, 16, compiled=True)
    t0 = time.perf_counter()
    for batch in data[:4]:  # every new shape may compile: the first steps, apart
        compiled(batch)
    print(f"compile (first 4 steps): {time.perf_counter() - t0:.1f} s", flush=True)
    for batch in data[:4]:
        eager(batch)
    best = {"eager": 0.0, "compiled": 0.0}
    for _ in range(args.repeats):
        for name, step in (("eager", eager), ("compiled", compiled)):
            best[name] = max(best[name], tokens_per_s(step, data[4:]))
    print(
        f"{args.precision}: eager {best['eager']:,.0f} tokens/s, compiled {best['compiled']:,.0f}"
    )
    print(f"compiled / eager: {best['compiled'] / best['eager']:.2f}x")


if __name__ == "__main__":
    main()
