"""Shared timing helper for the micro-benchmarks."""

import time
from collections.abc import Callable


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
