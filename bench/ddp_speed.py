"""What DistributedDataParallel costs on a small machine: the Multi30k De→En preset trained for
the same steps (the same global batch: 2 batches of 2,048 tokens a step) by one process with 2
threads and by 2 processes with 1 thread each (torchrun, gloo), target tokens/s from the loop's
own progress line at the last step; and the all-reduce of a gradient the size of the model's
(7.6 M floats) between 2 gloo processes, timed alone.

    .venv/bin/python bench/ddp_speed.py              # ~6 minutes on 2 cores
    .venv/bin/python bench/ddp_speed.py --steps 40
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent


def train(out: Path, steps: int, processes: int) -> tuple[float, str]:
    threads = 2 // processes
    args = ["train", "--preset", "multi30k-de-en", "--out", str(out), "--overwrite"]
    args += ["--max-steps", str(steps), "--accumulate", "2", "--threads", str(threads)]
    args += ["--eval-every", "100000", "--eval-sentences", "20", "--log-every", str(steps)]
    if processes == 1:
        cmd = [sys.executable, "-m", "qkv", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        cmd += ["-m", "qkv", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    line = next(x for x in done.stderr.splitlines() if x.startswith(f"step {steps} "))
    return float(re.search(r"([\d,]+) tok/s", line).group(1).replace(",", "")), line


def _reduce(rank: int, port: int, numel: int, repeats: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    grad = torch.randn(numel)
    for _ in range(3):
        dist.all_reduce(grad)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(grad)
    if rank == 0:
        out.put((time.perf_counter() - start) / repeats)
    dist.destroy_process_group()


def all_reduce_seconds(numel: int, repeats: int = 20) -> float:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_reduce, args=(r, port, numel, repeats, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    seconds = out.get(timeout=300)
    for p in procs:
        p.join()
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one, one_line = train(Path(tmp) / "one", args.steps, 1)
        two, two_line = train(Path(tmp) / "two", args.steps, 2)
        one_again, _ = train(Path(tmp) / "one", args.steps, 1)  # the machine drifts
    params = 7_600_000
    seconds = all_reduce_seconds(params)
    print(f"1 process x 2 threads: {one_line}")
    print(f"2 processes x 1 thread: {two_line}")
    best_one = max(one, one_again)
    print(f"\ntokens/s: 1x2 {one:,.0f} and {one_again:,.0f} (before and after), 2x1 {two:,.0f}")
    print(f"2 processes / 1 process: {two / best_one:.2f}x")
    print(f"all-reduce of {params:,} floats between 2 gloo processes: {seconds * 1000:.1f} ms")


if __name__ == "__main__":
    main()
