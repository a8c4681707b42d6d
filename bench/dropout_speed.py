"""PyTorch's CPU dropout vs qkv's (`qkv.dropout.dropout`: its mask applied as one
multiplication, since 2026-11-29; the mask drawn by qkv's C++ kernel since 2026-11-30, or
without it by PyTorch's generator, `torch_mask`) and the torch.where version it replaced,
forward + backward, on a tensor the size of one feed-forward activation of a 2048-token batch
(64 x 32 x 1024), fp32 and bf16, alternated.

    .venv/bin/python bench/dropout_speed.py              # 2 threads
    .venv/bin/python bench/dropout_speed.py --threads 1
"""

import argparse
import time

import torch
import torch.nn.functional as F

from qkv import native
from qkv.dropout import dropout


def dropout_by_where(x: torch.Tensor, p: float) -> torch.Tensor:
    """qkv's dropout until 2026-11-29: the same 16-bit draws and mask, applied with torch.where
    (same values and gradients as the multiplication)."""
    n = x.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
    bits = words.view(torch.int16)[:n].view(x.shape)
    cut = round(p * 65536)
    return torch.where(bits >= cut - 32768, x * (65536 / (65536 - cut)), 0.0)


def torch_masked(x: torch.Tensor, p: float) -> torch.Tensor:
    with native.off():  # qkv's dropout with PyTorch's generator drawing the mask
        return dropout(x, p, True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    torch.set_num_threads(ap.parse_args().threads)
    assert native.masks() is not None or native._built() is not None, "C++ kernels did not build"
    native._state["masks"] = native._built()  # the C++ mask, whatever its quick check says
    for dtype in (torch.float32, torch.bfloat16):
        x0 = torch.randn(64, 32, 1024).to(dtype)

        def timed(fn, x0=x0) -> float:
            x = x0.clone().requires_grad_()
            t0 = time.perf_counter()
            fn(x).sum().backward()
            return time.perf_counter() - t0

        systems = {
            "F.dropout": lambda x: F.dropout(x, 0.1, True),
            "qkv, C++ mask": lambda x: dropout(x, 0.1, True),
            "qkv, torch mask": lambda x: torch_masked(x, 0.1),
            "where (old)": lambda x: dropout_by_where(x, 0.1),
            "no dropout": lambda x: x * 1.0,
        }
        best = {name: float("inf") for name in systems}
        for _ in range(20):
            for name, fn in systems.items():
                best[name] = min(best[name], timed(fn))
        base = best["no dropout"]
        print(f"{dtype}, {torch.get_num_threads()} threads:")
        for name, t in best.items():
            print(f"  {name:16} {1e3 * t:6.2f} ms   dropout's own cost {1e3 * (t - base):6.2f} ms")
        for name in ("qkv, C++ mask", "qkv, torch mask"):
            ratio = (best["F.dropout"] - base) / (best[name] - base)
            print(f"  {name} costs {ratio:.1f}x less than F.dropout")


if __name__ == "__main__":
    main()
