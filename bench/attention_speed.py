"""One decoding step's attention on the CPU: PyTorch's fused kernel (SDPA) vs the explicit math
(qkv.attention's weights branch), and which one `attention()` picks for the shape. Shapes of
the small translation model (8 heads of 32) with 32 sentences, greedy (32 rows) or beam 5 (160
rows); self-attention reads a slice of a larger cache buffer, as KVCache hands it out;
cross-attention has a padding mask.

With --train: training's attention instead, forward + backward with dropout 0.1 on the weights,
in fp32 and bf16, at the shapes of real 2,048-token Multi30k batches (B sentences of T tokens):
PyTorch's fused kernel (which, given dropout on the CPU, falls back to its own math in fp32 with
a bernoulli mask) against the explicit math with qkv's dropout mask, which `attention()` uses
for training on the CPU.

    .venv/bin/python bench/attention_speed.py
    .venv/bin/python bench/attention_speed.py --train
"""

import sys

import torch
import torch.nn.functional as F
from timing import best_of

from qkv.attention import attention


def train() -> None:
    g = torch.Generator().manual_seed(0)
    print(f"{'dtype':>8} {'kind':>6} {'B':>4} {'T':>3}", end="")
    print(f" {'SDPA ms':>8} {'math ms':>8} {'SDPA / math':>12}")
    for dtype in (torch.float32, torch.bfloat16):
        for kind, b, t in (
            ("self", 136, 14),
            ("self", 113, 17),
            ("causal", 113, 17),
            ("self", 64, 30),
        ):
            q, k, v = (
                torch.randn(b, 8, t, 32, generator=g).to(dtype).requires_grad_() for _ in "qkv"
            )
            grad = torch.randn(b, 8, t, 32, generator=g).to(dtype)
            mask = None
            if kind == "self":  # padded sources
                mask = torch.ones(b, 1, 1, t, dtype=torch.bool)
                mask[::3, ..., -3:] = False
            causal = kind == "causal"

            def fused(a=(q, k, v, mask), c=causal, grad=grad):
                F.scaled_dot_product_attention(*a, dropout_p=0.1, is_causal=c).backward(grad)

            def math(a=(q, k, v, mask), c=causal, grad=grad):
                attention(*a, is_causal=c, dropout=0.1)[0].backward(grad)

            a, b_ = best_of(fused, n=20), best_of(math, n=20)
            name = str(dtype).removeprefix("torch.")
            print(f"{name:>8} {kind:>6} {b:4} {t:3} {a / 1e3:8.2f} {b_ / 1e3:8.2f} {a / b_:11.2f}x")


def main() -> None:
    torch.set_num_threads(2)
    if "--train" in sys.argv[1:]:
        return train()
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
