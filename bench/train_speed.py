"""Training throughput, same shape: qkv vs HF `MarianMTModel` vs a plain `torch.nn.Transformer`.

Each step: forward, label-smoothed cross-entropy (0.1) on the real target tokens, backward,
clipping, AdamW. Dropout 0.1 everywhere. Batches: "synthetic" (B sentences of fixed lengths, no
padding) or "real" (Multi30k De-En token batches of 2048 as `qkv train` cuts them, the same
batches for every system). Systems are alternated and each measured --repeats times; the best
counts. Also a 2048x2048 matmul's GFLOP/s (this CPU's practical peak) and qkv's achieved
matmul GFLOP/s, so the distance to the physical limit is visible.

`--precision bf16`: every system's forward pass and loss under the same bf16 autocast (as `qkv
train --precision bf16` runs qkv; weights, gradients and AdamW in fp32), plus qkv in fp32
("qkv-fp32") in the same alternation, for the bf16 / fp32 ratio; the peak is then a bf16 matmul's.
The process keeps freed memory for reuse (`qkv.allocator`, as the `qkv` command does), which
every system in it gains from alike.

    .venv/bin/python bench/train_speed.py --size small
    .venv/bin/python bench/train_speed.py --size base --steps 4
    .venv/bin/python bench/train_speed.py --size small --precision bf16
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from qkv.allocator import keep_freed_memory
from qkv.config import ModelConfig
from qkv.data import Seq2SeqBatch
from qkv.loss import seq2seq_loss
from qkv.models import EncoderDecoder

V, PAD = 8000, 0
SIZES = {"small": (256, 3, 1024), "base": (512, 6, 2048)}


class TorchTransformer(nn.Module):
    """The plain PyTorch baseline: nn.Transformer between embeddings and an output projection."""

    def __init__(self, d: int, layers: int, ffn: int):
        super().__init__()
        self.embed = nn.Embedding(V, d, padding_idx=PAD)
        self.pos = nn.Embedding(256, d)
        self.t = nn.Transformer(d, 8, layers, layers, ffn, 0.1, batch_first=True, norm_first=True)
        self.out = nn.Linear(d, V, bias=False)
        self.out.weight = self.embed.weight
        self.scale = math.sqrt(d)

    def forward(self, src, tgt):
        def emb(x):
            return self.embed(x) * self.scale + self.pos.weight[: x.shape[1]]

        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], dtype=torch.bool)
        h = self.t(
            emb(src),
            emb(tgt),
            tgt_mask=causal,
            src_key_padding_mask=src == PAD,
            memory_key_padding_mask=src == PAD,
            tgt_is_causal=True,
        )
        return self.out(h)


def build(system: str, size: str) -> nn.Module:
    d, layers, ffn = SIZES[size]
    torch.manual_seed(0)
    if system == "qkv":
        cfg = ModelConfig(
            vocab_size=V,
            d_model=d,
            n_heads=8,
            d_ff=ffn,
            n_encoder_layers=layers,
            n_decoder_layers=layers,
            dropout=0.1,
            share_embeddings=True,
            pad_id=PAD,
        )
        return EncoderDecoder(cfg)
    if system == "hf":
        cfg = transformers.MarianConfig(
            vocab_size=V,
            d_model=d,
            encoder_layers=layers,
            decoder_layers=layers,
            encoder_attention_heads=8,
            decoder_attention_heads=8,
            encoder_ffn_dim=ffn,
            decoder_ffn_dim=ffn,
            dropout=0.1,
            attention_dropout=0.1,
            activation_dropout=0.1,
            pad_token_id=PAD,
            decoder_start_token_id=PAD,
            max_position_embeddings=256,
        )
        return transformers.MarianMTModel(cfg)
    return TorchTransformer(d, layers, ffn)


def loss_of(system: str, model: nn.Module, src, tgt_in, tgt_out) -> torch.Tensor:
    if system == "qkv":  # `qkv train`'s loss: vocabulary projection on real tokens only
        batch = Seq2SeqBatch(src, tgt_in, tgt_out, int((tgt_out != PAD).sum()))
        return seq2seq_loss(model, batch, 0.1)
    if system == "hf":
        logits = model(
            input_ids=src, attention_mask=(src != PAD).long(), decoder_input_ids=tgt_in
        ).logits
    else:
        logits = model(src, tgt_in)
    return F.cross_entropy(
        logits.flatten(0, 1),
        tgt_out.flatten(),
        ignore_index=PAD,
        reduction="sum",
        label_smoothing=0.1,
    )


def synthetic(n: int, b: int, s: int, t: int):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        src = torch.randint(3, V, (b, s), generator=g)
        tgt = torch.randint(3, V, (b, t + 1), generator=g)
        out.append((src, tgt[:, :-1].contiguous(), tgt[:, 1:].contiguous()))
    return out


def real(n: int):
    from qkv.data import collate, multi30k, token_batches
    from qkv.tasks.translation import encode_pairs
    from qkv.tokenizer import Subwords

    pairs = multi30k("train", "de", "en")[:8000]
    tok = Subwords.train([s for s, _ in pairs] + [t for _, t in pairs], V)
    examples, _ = encode_pairs(tok, pairs, 250)
    batches = token_batches(examples, 2048, 0, 0)[:n]
    batches = [collate([examples[i] for i in b], 0, 1, 2) for b in batches]
    return [(b.src, b.tgt_in, b.tgt_out) for b in batches]


def matmul_flops(model: nn.Module, src, tgt_in, d: int, layers: int, ffn: int) -> float:
    """Matmul FLOPs of one training step (forward + backward = 3x forward), counting what qkv
    computes: real target tokens in the vocabulary projection, padded positions elsewhere."""
    b, s = src.shape
    t = tgt_in.shape[1]
    real_tgt = int((tgt_in != PAD).sum())
    enc = b * s * layers * (4 * d * d + 2 * d * ffn) + layers * 2 * b * s * s * d
    dec = b * t * layers * (4 * d * d + 2 * d * d + 2 * d * ffn) + layers * 2 * b * s * d * d
    dec += layers * (2 * b * t * t * d + 2 * b * t * s * d)
    head = real_tgt * d * V
    return 2 * 3 * (enc + dec + head)


def timed_steps(system: str, model: nn.Module, opt, data, bf16: bool) -> float:
    """Seconds for one training step per batch of `data`: forward and loss (in bf16 autocast
    where `bf16`), backward, clipping, the optimizer's step."""
    t0 = time.perf_counter()
    for src, tgt_in, tgt_out in data:
        n = int((tgt_out != PAD).sum())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(system, model, src, tgt_in, tgt_out)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="small")
    ap.add_argument("--batches", choices=["synthetic", "real", "both"], default="both")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the `qkv` command runs; process-wide, so every system gains alike
    d, layers, ffn = SIZES[args.size]
    bf16 = args.precision == "bf16"

    a = torch.randn(2048, 2048, dtype=torch.bfloat16 if bf16 else torch.float32)
    a @ a
    t0 = time.perf_counter()
    for _ in range(5):
        a @ a
    peak = 5 * 2 * 2048**3 / (time.perf_counter() - t0) / 1e9
    print(
        f"size {args.size}, {args.threads} threads, {args.precision}; "
        f"2048^2 {args.precision} matmul: {peak:.1f} GFLOP/s"
    )

    systems = ["qkv", "hf", "torch"] + (["qkv-fp32"] if bf16 else [])
    models = {s: build(s.removesuffix("-fp32"), args.size).train() for s in systems}
    opts = {
        s: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=s.startswith("qkv"))
        for s, m in models.items()
    }
    kinds = ["synthetic", "real"] if args.batches == "both" else [args.batches]
    for kind in kinds:
        data = synthetic(args.steps, 64, 20, 25) if kind == "synthetic" else real(args.steps)
        tokens = sum(int((o != PAD).sum()) for _, _, o in data)

        def run(system: str, data=data) -> float:
            bf16_here = bf16 and system != "qkv-fp32"
            return timed_steps(
                system.removesuffix("-fp32"), models[system], opts[system], data, bf16_here
            )

        for s in systems:
            run(s)  # warm-up
        best = {s: math.inf for s in systems}
        for _ in range(args.repeats):
            for s in systems:  # alternated
                best[s] = min(best[s], run(s))
        flops = sum(matmul_flops(models["qkv"], src, ti, d, layers, ffn) for src, ti, _ in data)
        print(f"\n{kind} batches ({len(data)} steps, {tokens:,} target tokens):")
        print(f"{'system':8} {'tgt tok/s':>10} {'qkv / it':>9}")
        for s in systems:
            print(f"{s:8} {tokens / best[s]:10.0f} {best[s] / best['qkv']:8.2f}x")
        gf = flops / best["qkv"] / 1e9
        print(f"qkv matmul work: {gf:.1f} GFLOP/s = {100 * gf / peak:.0f}% of the matmul peak")


if __name__ == "__main__":
    main()
