"""qkv's C++ kernel for attention while decoding (qkv/native.py) against PyTorch's fused kernel
(scaled_dot_product_attention): first each call alone at decoding's shapes (32 sentences, 8
heads of 32 as the small Marian model has, or of 64; greedy's one query per row, beam 5's 160
rows, and cross-attention's 5 beams of a sentence sharing its keys), then the small random
Marian model of translate_speed.py decoding 8 batches of 32 sentences (25 forced tokens, greedy
and beam 5, packed fp32 as `qkv translate` runs it) with the kernel and without, alternated in
one process, best of --repeats; sentences/s and how many outputs are the same.

    .venv/bin/python bench/decode_attention.py --threads 1
    .venv/bin/python bench/decode_attention.py --threads 2
"""

import torch
import torch.nn.functional as F
from fused_ffn import compare, decode_all, small_batches, small_model
from timing import ab_flags, best_of
from translate_speed import forced

from qkv import checkpoint, native
from qkv.packed import pack

# (rows, heads, queries per row, keys, head dimension, what)
CALLS = [
    (32, 8, 1, 12, 32, "greedy, self-attention at step 12"),
    (32, 8, 1, 25, 32, "greedy, self-attention at step 25"),
    (32, 8, 1, 21, 32, "greedy, cross-attention, 21 source tokens"),
    (160, 8, 1, 25, 32, "beam 5, self-attention at step 25"),
    (32, 8, 5, 21, 32, "beam 5, cross-attention (5 beams share keys)"),
    (32, 8, 1, 25, 64, "greedy, step 25, heads of 64"),
]


def per_call(repeats: int) -> None:
    def best(fn) -> float:
        return best_of(fn, repeats * 3, 50)

    print("per call (us): PyTorch's fused kernel, qkv's, ratio")
    with torch.inference_mode():
        for b, h, t, s, dh, what in CALLS:
            gen = torch.Generator().manual_seed(0)
            q = torch.randn(b, h, t, dh, generator=gen)
            # keys and values in a longer buffer, as the KV cache holds them
            k, v = (torch.randn(b, h, 64, dh, generator=gen)[:, :, :s] for _ in range(2))
            mask = torch.ones(b, 1, 1, s, dtype=torch.bool)
            mask[: b // 2, ..., -3:] = False  # some rows' last keys are padding
            ours = best(lambda q=q, k=k, v=v, m=mask: native.decode_attention(q, k, v, m))
            theirs = best(lambda q=q, k=k, v=v, m=mask: F.scaled_dot_product_attention(q, k, v, m))
            print(f"  {what:45} {theirs:7.1f} {ours:7.1f}  {theirs / ours:.2f}x")


def main() -> None:
    args = ab_flags(__doc__)
    if native.kernel() is None:
        raise SystemExit("the kernel is not in use here (see the line above)")
    print(f"{args.threads} threads, torch {torch.__version__}")
    per_call(args.repeats)
    model = pack(checkpoint.load(small_model("qkv-attn-"))[0])
    batches, lengths = small_batches()
    print("small model, 8 x 32 sentences, sentences/s")
    for beam in (1, 5):
        cfg = forced(beam)

        def run(ours: bool, cfg=cfg):
            if ours:
                return decode_all(model, batches, lengths, cfg)
            with native.off():
                return decode_all(model, batches, lengths, cfg)

        line = "  {mode:7}: qkv's kernel {on:6.1f}, PyTorch's {off:6.1f} -> {ratio:.2f}x"
        compare(run, args.repeats, beam, line + "; outputs the same {same}/256")


if __name__ == "__main__":
    main()
