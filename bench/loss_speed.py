"""Cross-entropy, forward + backward, 2 threads, alternated, best of 10:

1. PyTorch's label-smoothed cross-entropy vs qkv's (`qkv.loss.smoothed_cross_entropy`) on the
   logits of one 2048-token batch's real target tokens (1,800 x 8k vocabulary);
2. the output layer and the loss together, on the `ml-1m` preset's shapes (3,200 positions,
   width 128, 3,416 items): logits = h @ E.T then F.cross_entropy, vs
   `qkv.loss.linear_cross_entropy`, which never holds the whole logit matrix.

    .venv/bin/python bench/loss_speed.py
"""

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from qkv.loss import linear_cross_entropy, smoothed_cross_entropy


def race(systems: dict[str, Callable[[], torch.Tensor]], base: str) -> None:
    best = {name: float("inf") for name in systems}
    for _ in range(10):
        for name, fn in systems.items():
            t0 = time.perf_counter()
            fn().backward()
            best[name] = min(best[name], time.perf_counter() - t0)
    for name, t in best.items():
        print(f"{name:36} {t * 1e3:7.1f} ms   {best[base] / t:.2f}x")


def main() -> None:
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    logits0 = torch.randn(1800, 8000, generator=g)
    target = torch.randint(0, 8000, (1800,), generator=g)

    def fresh() -> torch.Tensor:
        return logits0.clone().requires_grad_()

    print("label-smoothed cross-entropy, 1,800 x 8,000 logits")
    race(
        {
            "F.cross_entropy": lambda: F.cross_entropy(
                fresh(), target, reduction="sum", label_smoothing=0.1
            ),
            "qkv smoothed_cross_entropy": lambda: smoothed_cross_entropy(fresh(), target, 0.1),
        },
        "F.cross_entropy",
    )
    h = torch.randn(3200, 128, generator=g).requires_grad_()
    e = (torch.randn(3416, 128, generator=g) * 128**-0.5).requires_grad_()
    items = torch.randint(0, 3416, (3200,), generator=g)
    print("\noutput layer + cross-entropy, 3,200 positions x width 128 x 3,416 items")
    race(
        {
            "h @ E.T, F.cross_entropy": lambda: F.cross_entropy(h @ e.T, items, reduction="sum"),
            "qkv linear_cross_entropy": lambda: linear_cross_entropy(h, e, items),
        },
        "h @ E.T, F.cross_entropy",
    )


if __name__ == "__main__":
    main()
