"""One decoding step's attention on the CPU: PyTorch's fused kernel (SDPA) vs the explicit math
(qkv.attention's weights branch), and which one `attention()` picks for the shape. Shapes of
the small translation model (8 heads of 32) with 32 sentences, greedy (32 rows) or beam 5 (160
rows); self-attention reads a slice of a larger cache buffer, as KVCache hands it out;
cross-attention has a padding mask.

    .venv/bin/python bench/attention_speed.py
"""

import torch
import torch.nn.functional as F
from timing import best_of

from qkv.attention import attention


def main() -> None:
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    h, dh = 8, 32
    print(f"{'rows':>5} {'kind':>6} {'keys':>5} {'SDPA us':>9} {'math us':>9}", end="")
    print(f" {'SDPA / math':>12} {'picks':>6}")
    for rows in (32, 160):
        q = torch.randn(rows, h, 1, dh, generator=g)
        for kind, keys in (("self", 5), ("self", 15), ("self", 25), ("cross", 21)):
            if kind == "self":  # the used part of a cache with room for 32 positions
                k = torch.randn(rows, h, 32, dh, generator=g)[:, :, :keys]
                v = torch.randn(rows, h, 32, dh, generator=g)[:, :, :keys]
                mask = None
            else:
                k = torch.randn(rows, h, keys, dh, generator=g)
                v = torch.randn(rows, h, keys, dh, generator=g)
                mask = torch.ones(rows, 1, 1, keys, dtype=torch.bool)
                mask[::3, ..., -4:] = False  # some padded sources
            args = (q, k, v, mask)
            fused = best_of(
                lambda a=args: F.scaled_dot_product_attention(*a[:3], attn_mask=a[3]), n=200
            )
            math = best_of(lambda a=args: attention(*a, need_weights=True), n=200)
            want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            torch.testing.assert_close(attention(q, k, v, mask)[0], want, atol=1e-5, rtol=1e-5)
            picks = "math" if rows * h >= 512 else "SDPA"  # attention()'s rule
            print(f"{rows:5} {kind:>6} {keys:5} {fused:9.1f} {math:9.1f}", end="")
            print(f" {fused / math:11.2f}x {picks:>6}")


if __name__ == "__main__":
    main()
