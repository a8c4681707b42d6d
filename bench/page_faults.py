"""Page faults per training step, with glibc's default malloc settings and with freed memory
kept for reuse (`qkv.allocator.keep_freed_memory`, what the `qkv` command sets): the
multi30k-de-en preset's model on real Multi30k De-En token batches of 2048, each setting in its
own process (the setting is process-wide), fp32 and bf16 autocast. Faults are counted
(getrusage), seconds per step are timed over the same 7 steps after 3 of warm-up.

    .venv/bin/python bench/page_faults.py
    .venv/bin/python bench/page_faults.py --threads 1 --precisions bf16
"""

import argparse
import resource
import subprocess
import sys
import time

import torch
from profile_train import training_step

from qkv.allocator import keep_freed_memory


def one(keep: bool, precision: str, threads: int) -> None:
    torch.set_num_threads(threads)
    if keep:
        assert keep_freed_memory()
    step, data = training_step(precision == "bf16", 10)
    for batch in data[:3]:
        step(batch)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for batch in data[3:]:
        step(batch)
    seconds = (time.perf_counter() - t0) / 7
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 7
    name = "kept for reuse" if keep else "glibc default"
    print(f"{precision:5} {name:15} {faults:10,.0f} {seconds:8.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--one", nargs=2, metavar=("KEEP", "PRECISION"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args.one[0] == "keep", args.one[1], args.threads)
    print(f"{args.threads} threads; {'precision':5} {'freed memory':15} {'faults/step':>10} s/step")
    for precision in args.precisions.split(","):
        for keep in ("default", "keep"):
            cmd = [
                sys.executable,
                __file__,
                "--threads",
                str(args.threads),
                "--one",
                keep,
                precision,
            ]
            subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
