"""PyTorch's label-smoothed cross-entropy vs qkv's (`qkv.loss.smoothed_cross_entropy`), forward
+ backward, on the logits of one 2048-token batch's real target tokens (1,800 x 8k vocabulary),
2 threads, alternated, best of 10.

    .venv/bin/python bench/loss_speed.py
"""

import time

import torch
import torch.nn.functional as F

from qkv.loss import smoothed_cross_entropy


def main() -> None:
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    logits0 = torch.randn(1800, 8000, generator=g)
    target = torch.randint(0, 8000, (1800,), generator=g)
    systems = {
        "F.cross_entropy": lambda x: F.cross_entropy(
            x, target, reduction="sum", label_smoothing=0.1
        ),
        "qkv smoothed_cross_entropy": lambda x: smoothed_cross_entropy(x, target, 0.1),
    }
    best = {name: float("inf") for name in systems}
    for _ in range(10):
        for name, fn in systems.items():
            x = logits0.clone().requires_grad_()
            t0 = time.perf_counter()
            fn(x).backward()
            best[name] = min(best[name], time.perf_counter() - t0)
    base = best["F.cross_entropy"]
    for name, t in best.items():
        print(f"{name:28} {t * 1e3:7.1f} ms   {base / t:.2f}x")


if __name__ == "__main__":
    main()
