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


def alternate(run: Callable[[bool], tuple[float, list]], repeats: int) -> tuple[dict, int]:
    """A with/without comparison in one process: run(True) and run(False) (each returning a
    rate and its outputs) alternated `repeats` times after a warm-up of each; the best rate of
    each, and how many of their outputs are the same."""
    best, outs = {}, {}
    run(True), run(False)  # warm-up
    for _ in range(repeats):
        for on in (True, False):
            rate, outs[on] = run(on)
            best[on] = max(best.get(on, 0.0), rate)
    return best, sum(a == b for a, b in zip(outs[True], outs[False], strict=True))


def tokens_per_s(step: Callable[[object], object], batches: list) -> float:
    """Target tokens per second of `step` over `batches` (training steps on token batches)."""
    t0, tokens = time.perf_counter(), 0
    for batch in batches:
        step(batch)
        tokens += batch.tokens
    return tokens / (time.perf_counter() - t0)


def threads_flag(doc: str) -> argparse.Namespace:
    """The one-kernel comparisons' flag (--threads, default 1), with the threads set."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args


def ab_flags(doc: str) -> argparse.Namespace:
    """The with/without comparisons' flags (--threads, --repeats), with the threads set and
    freed memory kept for reuse, as the `qkv` command runs."""
    from qkv.allocator import keep_freed_memory

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    return args


def profiler_flags(
    doc: str, rows: int, precisions=("fp32", "bf16"), extra=None
) -> argparse.Namespace:
    """The profile_*.py scripts' flags (--precision, --threads, --rows, and `extra(ap)`'s),
    with threads set."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    if extra is not None:
        extra(ap)
    ap.add_argument("--precision", choices=list(precisions), default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=rows, help="operators listed")
    ap.add_argument("--shapes", action="store_true", help="one line per operator and input shapes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args
