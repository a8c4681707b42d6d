"""PyTorch's CPU dropout vs qkv's (`qkv.layers.dropout`), forward + backward, on a tensor the size
of one feed-forward activation of a 2048-token batch (64 x 32 x 1024), 2 threads, alternated.

    .venv/bin/python bench/dropout_speed.py
"""

import time

import torch
import torch.nn.functional as F

from qkv.layers import dropout


def main() -> None:
    torch.set_num_threads(2)
    x0 = torch.randn(64, 32, 1024)

    def timed(fn) -> float:
        x = x0.clone().requires_grad_()
        t0 = time.perf_counter()
        fn(x).sum().backward()
        return time.perf_counter() - t0

    systems = {
        "F.dropout": lambda x: F.dropout(x, 0.1, True),
        "qkv dropout": lambda x: dropout(x, 0.1, True),
        "no dropout": lambda x: x * 1.0,
    }
    best = {name: float("inf") for name in systems}
    for _ in range(20):
        for name, fn in systems.items():
            best[name] = min(best[name], timed(fn))
    base = best["no dropout"]
    for name, t in best.items():
        print(f"{name:12} {1e3 * t:6.2f} ms   dropout's own cost {1e3 * (t - base):6.2f} ms")
    ratio = (best["F.dropout"] - base) / (best["qkv dropout"] - base)
    print(f"qkv's dropout costs {ratio:.1f}x less than F.dropout")


if __name__ == "__main__":
    main()
