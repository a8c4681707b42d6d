"""One linear layer on the CPU, as decoding calls it (32 rows = greedy over 32 sentences, 160 =
beam 5): F.linear (MKL) vs qkv.packed's prepacked fp32 (MKL's packed product where qkv uses it,
qkv/native.py, else oneDNN's) and int8 (fbgemm) kernels, over the layer shapes of the small and
base translation models. oneDNN's and fbgemm's packed kernels cost more per call and save more
per weight; qkv.packed.MIN_WEIGHTS is where they start to win (MKL's wins at every size;
bench/packed_gemm.py).

    .venv/bin/python bench/linear_speed.py
    .venv/bin/python bench/linear_speed.py --threads 1 --cold

--cold: before each timed call, a product the size of the output layer (32 x 256 by 256 x
8,000) runs, as in a decoding step, where each layer finds its weights and inputs evicted by the
layers before it; the time printed is that call's alone. (Without it, calls back to back keep
everything in cache.)
"""

import argparse
import time

import torch
import torch.nn.functional as F
from timing import best_of
from torch import nn

from qkv.packed import MIN_WEIGHTS, PackedLinear


def after_eviction(fn, n: int = 200) -> float:
    """Microseconds of one call of fn right after an 8 MB product, averaged over n calls."""
    big, x = torch.randn(8000, 256), torch.randn(32, 256)
    total = 0.0
    for i in range(n + 10):
        F.linear(x, big)
        t0 = time.perf_counter()
        fn()
        if i >= 10:
            total += time.perf_counter() - t0
    return total / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cold", action="store_true", help="time each call after an 8 MB product")
    args = ap.parse_args()
    timed = after_eviction if args.cold else best_of
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = [(16, 16), (256, 256), (256, 768), (256, 1024), (1024, 256), (512, 512)]
    shapes += [(512, 1536), (512, 2048), (2048, 512), (256, 8000), (512, 8000)]
    print(f"{'rows':>4} {'in x out':>11} {'weights':>8} {'F.linear us':>12} {'packed':>8}", end="")
    print(f" {'int8':>8} {'plain / packed':>15} {'plain / int8':>13} {'qkv packs':>10}")
    for rows in (32, 160):
        for d_in, d_out in shapes:
            lin = nn.Linear(d_in, d_out)
            packed, int8 = PackedLinear(lin), PackedLinear(lin, int8=True)
            x = torch.randn(rows, 1, d_in)  # (B, T, D), as a decoding step
            with torch.inference_mode():
                plain = timed(lambda lin=lin, x=x: lin(x))
                fp32 = timed(lambda m=packed, x=x: m(x))
                q8 = timed(lambda m=int8, x=x: m(x))
                torch.testing.assert_close(packed(x), lin(x), atol=1e-4, rtol=1e-4)
                n = d_in * d_out
                print(f"{rows:4} {d_in:5}x{d_out:<5} {n:8} {plain:12.1f} {fp32:8.1f}", end="")
                print(f" {q8:8.1f} {plain / fp32:14.2f}x {plain / q8:12.2f}x", end="")
                print(f" {'yes' if n >= MIN_WEIGHTS else 'no':>10}")


if __name__ == "__main__":
    main()
