"""PyTorch's CPU dropout vs qkv's (`qkv.dropout.dropout`: its mask applied as one
multiplication, since 2026-11-29) and the torch.where version it replaced, forward + backward,
on a tensor the size of one feed-forward activation of a 2048-token batch (64 x 32 x 1024),
2 threads, alternated.

    .venv/bin/python bench/dropout_speed.py
"""

import time

import torch
import torch.nn.functional as F

from qkv.dropout import dropout


def dropout_by_where(x: torch.Tensor, p: float) -> torch.Tensor:
    """qkv's dropout until 2026-11-29: the same 16-bit draws and mask, applied with torch.where
    (same values and gradients as the multiplication)."""
    n = x.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
    bits = words.view(torch.int16)[:n].view(x.shape)
    cut = round(p * 65536)
    return torch.where(bits >= cut - 32768, x * (65536 / (65536 - cut)), 0.0)


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
        "where (old)": lambda x: dropout_by_where(x, 0.1),
        "no dropout": lambda x: x * 1.0,
    }
    best = {name: float("inf") for name in systems}
    for _ in range(20):
        for name, fn in systems.items():
            best[name] = min(best[name], timed(fn))
    base = best["no dropout"]
    for name, t in best.items():
        print(f"{name:13} {1e3 * t:6.2f} ms   dropout's own cost {1e3 * (t - base):6.2f} ms")
    ratio = (best["F.dropout"] - base) / (best["qkv dropout"] - base)
    print(f"qkv's dropout costs {ratio:.1f}x less than F.dropout")


if __name__ == "__main__":
    main()
