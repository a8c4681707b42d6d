"""Freed memory kept for reuse, so large temporaries do not cost fresh pages at every step.

glibc's malloc serves large blocks (above a threshold that adapts up to 32 MB) with mmap and
returns them to the kernel when they are freed, and the heap's free top above 128 KB too. The next
block of that size then arrives as fresh pages, which the kernel zero-fills one 4 KB page at a
time on first touch. A training step makes and frees the same large tensors every step
(activations, gradients, optimizer temporaries: over 100 MB for a 2,048-token batch of the
Multi30k model), so it paid tens of thousands of page faults per step (31,000 in fp32 on the
Xeon of bench/README.md, 52 with this setting: bench/page_faults.py), a cost no kernel choice
removes. PyTorch's CPU tuning guide swaps the allocator
(jemalloc, tcmalloc) by preloading it; glibc's own two settings give the same reuse at these
sizes without a new dependency: serve every block below 1 GB from the heap, and never trim the
heap. The price: the process keeps the memory of its largest step instead of giving it back.

`keep_freed_memory()` sets them for the whole process; the `qkv` command calls it first. Elsewhere
(another libc, or `QKV_KEEP_FREED_MEMORY=0`) it changes nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
LARGEST = 1 << 30  # blocks below this come from the heap, and freed heap memory stays


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (see above); True if it agreed."""
    if not sys.platform.startswith("linux") or os.environ.get("QKV_KEEP_FREED_MEMORY") == "0":
        return False
    try:  # the process's own symbols, libc's among them (find_library would start ldconfig)
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a libc without mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # older glibc refuses thresholds above 32 MB: then the largest it accepts
    mmap_ok = mallopt(M_MMAP_THRESHOLD, LARGEST) or mallopt(M_MMAP_THRESHOLD, 32 << 20)
    return bool(mmap_ok and mallopt(M_TRIM_THRESHOLD, LARGEST))
