"""Shared helpers for the benchmarks: timing, and the profilers' flags."""

import argparse
import time
from collections.abc import Callable

import torch


def best_of(fn: Callable[[], object], repeats: int = 5, n: int = 100) -> float:
    """Microseconds per call of fn: the best of `repeats` runs of n calls, after 10 warm-ups."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n * 1e6)
    return min(times)


def tokens_per_s(step: Callable[[object], object], batches: list) -> float:
    """Target tokens per second of `step` over `batches` (training steps on token batches)."""
    t0, tokens = time.perf_counter(), 0
    for batch in batches:
        step(batch)
        tokens += batch.tokens
    return tokens / (time.perf_counter() - t0)


def profiler_flags(doc: str, rows: int) -> argparse.Namespace:
    """The profile_*.py scripts' flags (--precision, --threads, --rows), with threads set."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=rows, help="operators listed")
    ap.add_argument("--shapes", action="store_true", help="one line per operator and input shapes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args
