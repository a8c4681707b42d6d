"""STS-B test Spearman of an *untrained* encoder: how much of the score is lexical overlap
that random, near-orthogonal token vectors already capture, with and without SIF weights.

    python bench/stsb_untrained.py

One pre-LN layer (d 256, 4 heads), seed 0, 8k BPE trained on sts-train; three poolings: the
mean of the encoder's outputs, their SIF-weighted mean (a = 1e-3, frequencies from sts-train's
tokens), and the SIF-weighted mean of the token embeddings alone (no layer).
"""

from __future__ import annotations

import json

import torch

from qkv.config import ModelConfig
from qkv.data import pad_batch
from qkv.masks import padding_mask
from qkv.models import EncoderOnly, pool
from qkv.tasks.similarity import SIF_A, correlations, stsb
from qkv.tokenizer import Subwords


def main() -> None:
    train, test = stsb("train"), stsb("test")
    texts = [s for r in train for s in (r.a, r.b)]
    tok = Subwords.train(texts, 8000)
    ids = torch.tensor([i for x in tok.encode_batch(texts) for i in x])
    p = torch.bincount(ids, minlength=tok.vocab_size).float() / len(ids)
    sif = SIF_A / (SIF_A + p)
    torch.manual_seed(0)
    cfg = ModelConfig(
        arch="encoder-only",
        vocab_size=tok.vocab_size,
        n_encoder_layers=1,
        n_decoder_layers=0,
        d_model=256,
        n_heads=4,
    )
    model = EncoderOnly(cfg).eval()

    def vectors(sentences: list[str], how: str, layer: bool) -> torch.Tensor:
        x = pad_batch(tok.encode_batch(sentences), cfg.pad_id, cfg.eos_id)
        mask = padding_mask(x, cfg.pad_id)
        with torch.no_grad():
            h = model.encoder(x, mask) if layer else model.encoder.embed.token(x)
        return pool(h, mask, how, sif[x])

    results = {}
    for name, how, layer in (
        ("mean", "mean", True),
        ("sif_weighted_mean", "weighted", True),
        ("sif_weighted_token_embeddings", "weighted", False),
    ):
        a, b = vectors([r.a for r in test], how, layer), vectors([r.b for r in test], how, layer)
        cos = torch.nn.functional.cosine_similarity(a, b).tolist()
        results[name] = {k: round(v, 1) for k, v in correlations(cos, test).items()}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
