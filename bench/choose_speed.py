"""Search's choice of tokens on the CPU: torch.argmax and torch.topk against qkv.search's
block-wise argmax and topk (the same results; `amax`, the largest value without its position,
which they rest on, for reference), at decoding's shapes: greedy over 32 sentences
(32 rows of V scores), beam 5 over 32 (32 rows of 5 x V, the top 10), for an 8k vocabulary and
one that leaves a shorter last block; 1 and 2 threads, the process keeping freed memory as the
`qkv` command does.

    .venv/bin/python bench/choose_speed.py
"""

import torch
from timing import best_of

from qkv.allocator import keep_freed_memory
from qkv.search import argmax, topk


def main() -> None:
    keep_freed_memory()
    g = torch.Generator().manual_seed(0)
    print(f"{'threads':>7} {'what':>7} {'rows x scores':>14}", end="")
    print(f" {'torch us':>9} {'qkv us':>7} {'ratio':>7}")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for what, rows, width, k in (
            ("amax", 32, 8000, 0),
            ("argmax", 32, 8000, 1),
            ("argmax", 32, 8011, 1),
            ("top-10", 32, 5 * 8000, 10),
            ("top-10", 32, 5 * 8011, 10),
        ):
            x = torch.randn(rows, width, generator=g)
            if k == 0:  # the largest value without its position: what the blocks rest on
                theirs = ours = best_of(lambda x=x: x.amax(-1))
            elif k == 1:
                assert torch.equal(argmax(x), x.argmax(-1))
                theirs = best_of(lambda x=x: x.argmax(-1))
                ours = best_of(lambda x=x: argmax(x))
            else:
                assert torch.equal(topk(x, k)[1], x.topk(k).indices)
                theirs = best_of(lambda x=x, k=k: x.topk(k))
                ours = best_of(lambda x=x, k=k: topk(x, k))
            shape = f"{rows} x {width}"
            print(
                f"{threads:7} {what:>7} {shape:>14} {theirs:9.0f} {ours:7.0f} {theirs / ours:6.2f}x"
            )


if __name__ == "__main__":
    main()
