"""Search's work on a step's scores on the CPU, at decoding's shapes (32 sentences; an 8k
vocabulary and one that leaves a shorter last block), three ways: PyTorch's ops; qkv.search's
block-wise argmax and topk (what it uses where the C++ kernels are off); and qkv's C++ scans
(csrc/choose.cpp, what it uses where they are on). Each compares its results with PyTorch's.

- log-softmax: the last position's logits (32 rows of V) to log-probabilities;
- argmax: greedy's choice over 32 rows of V;
- beam step: beam 5's choice, adding each beam's score to its V log-probs and taking each
  sentence's top 10 of 5 x V (PyTorch: add, then topk; blocks: add, then block-wise topk).

1 and 2 threads, the process keeping freed memory as the `qkv` command does.

    .venv/bin/python bench/choose_speed.py
"""

import torch
from timing import best_of

from qkv import native
from qkv.allocator import keep_freed_memory
from qkv.search import block_argmax, topk


def main() -> None:
    keep_freed_memory()
    module = native._built()  # the C++ scans, whatever native's quick check would say
    assert module is not None, "qkv's C++ kernels did not build here"
    g = torch.Generator().manual_seed(0)
    print(f"{'threads':>7} {'what':>11} {'V':>5} {'torch us':>9} {'blocks us':>10} {'C++ us':>7}")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for v in (8000, 8011):
            logits = torch.randn(32, v, generator=g) * 3
            mine = logits.clone()
            module.log_softmax_(mine)
            assert torch.allclose(mine, logits.log_softmax(-1), atol=1e-5)
            soft = (
                best_of(lambda x=logits: x.log_softmax(-1)),
                None,
                best_of(lambda x=mine: module.log_softmax_(x)),  # log-softmax is idempotent
            )
            assert torch.equal(module.argmax_rows(logits), logits.argmax(-1))
            arg = (
                best_of(lambda x=logits: x.argmax(-1)),
                best_of(lambda x=logits: block_argmax(x)),
                best_of(lambda x=logits: module.argmax_rows(x)),
            )
            log_probs = (torch.randn(160, v, generator=g) * 3).log_softmax(-1)
            scores = -torch.rand(32, 5, generator=g) * 10
            whole = (log_probs + scores.view(-1, 1)).view(32, -1)
            values, positions = module.beam_topk(log_probs, scores.view(-1), 5, 10)
            assert torch.equal(positions, whole.topk(10).indices)

            def add(x=log_probs, s=scores):
                return (x + s.view(-1, 1)).view(32, -1)

            beam = (
                best_of(lambda: add().topk(10)),
                best_of(lambda: topk(add(), 10)),
                best_of(lambda x=log_probs, s=scores: module.beam_topk(x, s.view(-1), 5, 10)),
            )
            for what, (theirs, blocks, ours) in (
                ("log-softmax", soft),
                ("argmax", arg),
                ("beam step", beam),
            ):
                b = f"{blocks:10.0f}" if blocks is not None else f"{'-':>10}"
                print(f"{threads:7} {what:>11} {v:5} {theirs:9.0f} {b} {ours:7.0f}")


if __name__ == "__main__":
    main()
