"""One linear layer on the CPU, as decoding calls it (32 rows = greedy over 32 sentences, 160 =
beam 5): F.linear (MKL) vs qkv.packed's prepacked fp32 (oneDNN) and int8 (fbgemm) kernels, over
the layer shapes of the small and base translation models. The packed kernels cost more per call
and save more per weight; qkv.packed.MIN_WEIGHTS is where they start to win.

    .venv/bin/python bench/linear_speed.py
"""

import torch
from timing import best_of
from torch import nn

from qkv.packed import MIN_WEIGHTS, PackedLinear


def main() -> None:
    torch.set_num_threads(2)
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
                plain = best_of(lambda lin=lin, x=x: lin(x))
                fp32 = best_of(lambda m=packed, x=x: m(x))
                q8 = best_of(lambda m=int8, x=x: m(x))
                torch.testing.assert_close(packed(x), lin(x), atol=1e-4, rtol=1e-4)
                n = d_in * d_out
                print(f"{rows:4} {d_in:5}x{d_out:<5} {n:8} {plain:12.1f} {fp32:8.1f}", end="")
                print(f" {q8:8.1f} {plain / fp32:14.2f}x {plain / q8:12.2f}x", end="")
                print(f" {'yes' if n >= MIN_WEIGHTS else 'no':>10}")


if __name__ == "__main__":
    main()
