"""Sentence embeddings from any encoder, and what they are for: similarity and semantic search
(the conventions of sentence-transformers' `encode`, `cos_sim` and `semantic_search`).

An encoder turns a sentence into one vector per token; pooling makes one vector of them: the
mean over real tokens (padding never counts) or the first token's. This works on an
encoder-only model (classifier or bi-encoder) and on the encoder of a translation model.

    enc = SentenceEncoder.load("runs/stsb")
    a = enc.encode(["A man plays a guitar.", "Someone is playing music."])
    similarity(a, a)                     # (2, 2) cosines
    semantic_search(enc.encode(queries), enc.encode(corpus), k=5)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import pad_batch
from .masks import padding_mask
from .models import device_of, pool
from .tokenizer import Tokenizer


def encode_tokens(
    model: nn.Module, ids: Tensor, pooling: str | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """An encoder's per-token vectors (B, S, D), their pooled sentence embedding (B, D) and
    each token's pooling weight (B, S) (None for a model without token weights) for token ids
    (B, S) (each ending in eos, padded). `pooling` overrides the model's (mean for a
    translation model's encoder)."""
    cfg = model.config  # type: ignore[attr-defined]
    how = pooling or cfg.pooling
    mask = padding_mask(ids, cfg.pad_id)
    if cfg.arch == "decoder-only":
        raise ValueError("a decoder-only model has no encoder to embed sentences with")
    x = model.encoder(ids, mask)  # type: ignore[attr-defined]
    table = getattr(model, "token_weight", None)
    if how == "weighted" and table is None:
        raise ValueError("weighted pooling needs an encoder-only model's token weights")
    weights = None if table is None else table[ids]
    return x, pool(x, mask, how, weights), weights


def embed(model: nn.Module, ids: Tensor, pooling: str | None = None) -> Tensor:
    """Pooled sentence embeddings (B, D) of token ids (B, S), with gradients: what a
    bi-encoder trains (see encode_tokens)."""
    return encode_tokens(model, ids, pooling)[1]


def similarity(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of every row of a (N, D) with every row of b (M, D): (N, M)."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def semantic_search(
    queries: Tensor,
    corpus: Tensor,
    k: int = 10,
    chunk: int = 100_000,
    normalized: bool = False,
) -> list[list[tuple[int, float]]]:
    """For each query embedding, the k most similar corpus embeddings as (index, cosine), best
    first. The corpus is scored in chunks, so a large one never needs an (N, M) matrix at once.
    `normalized`: the corpus rows already have length 1 (encode(..., normalize=True)), so a
    search over a stored corpus does not normalize it again for every query."""
    q = F.normalize(queries.float(), dim=-1)
    k = min(k, len(corpus))
    best_scores = torch.full((len(q), 0), -2.0)
    best_index = torch.zeros((len(q), 0), dtype=torch.long)
    for start in range(0, len(corpus), chunk):
        c = corpus[start : start + chunk].float()
        c = c if normalized else F.normalize(c, dim=-1)
        scores, index = (q @ c.T).topk(min(k, len(c)), dim=1)
        best_scores = torch.cat([best_scores, scores], dim=1)
        best_index = torch.cat([best_index, index + start], dim=1)
        best_scores, order = best_scores.topk(min(k, best_scores.shape[1]), dim=1)
        best_index = best_index.gather(1, order)
    return [
        [(int(i), float(s)) for i, s in zip(ix, sc, strict=True)]
        for ix, sc in zip(best_index, best_scores, strict=True)
    ]


def labelled(labels: Sequence[str], probabilities: Sequence[float]) -> dict[str, Any]:
    """A classifier's answer for one sentence: the likeliest label, its probability, and every
    label's (rounded to 6 decimals)."""
    every = {label: round(float(p), 6) for label, p in zip(labels, probabilities, strict=True)}
    best = labels[max(range(len(labels)), key=lambda i: probabilities[i])]  # the first, on ties
    return {"label": best, "probability": every[best], "probabilities": every}


class SentenceEncoder:
    """A model and its tokenizer, turning sentences into embeddings in length-sorted batches."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        batch_size: int = 64,
        pooling: str | None = None,
    ):
        cfg = model.config  # type: ignore[attr-defined]
        if cfg.arch == "decoder-only":
            raise ValueError("a decoder-only model has no encoder to embed sentences with")
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.pooling = pooling
        self.max_tokens = cfg.max_len - 1  # room for eos

    @classmethod
    def load(
        cls, path: str | Path, device: str | torch.device = "cpu", **kwargs
    ) -> SentenceEncoder:
        """From a model directory, packed for fast CPU inference."""
        from .checkpoint import CheckpointError, load
        from .packed import pack

        model, tok, _ = load(path, device)
        if tok is None:
            raise CheckpointError(f"{path}: the model directory has no tokenizer")
        return cls(pack(model), tok, **kwargs)

    def ids(self, sentences: Sequence[str]) -> list[list[int]]:
        """Token ids of each sentence, cut to the model's positions (eos is added later)."""
        return [x[: self.max_tokens] for x in self.tokenizer.encode_batch(list(sentences))]

    @torch.inference_mode()
    def _batched(self, sentences: Sequence[str], fn, width: int) -> Tensor:
        """fn(ids (B, S)) -> (B, width) over length-sorted batches, back in the order given.
        Each batch's padding is masked, so no row depends on its neighbours."""
        cfg = self.model.config  # type: ignore[attr-defined]
        ids = self.ids(sentences)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = torch.zeros(len(ids), width)
        device = device_of(self.model)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            batch = pad_batch([ids[i] for i in chunk], cfg.pad_id, cfg.eos_id).to(device)
            out[chunk] = fn(batch).float().cpu()
        return out

    def encode(self, sentences: Sequence[str], normalize: bool = False) -> Tensor:
        """Embeddings (N, D), float32, in the order given (unit length with `normalize`)."""
        d = self.model.config.d_model  # type: ignore[attr-defined]
        out = self._batched(sentences, lambda ids: embed(self.model, ids, self.pooling), d)
        return F.normalize(out, dim=-1) if normalize else out

    def probabilities(self, sentences: Sequence[str]) -> Tensor:
        """A classifier's class probabilities (N, C)."""
        n = self.model.config.n_classes  # type: ignore[attr-defined]
        if not n:
            raise ValueError("the model has no classifier head")
        return self._batched(sentences, lambda ids: self.model(ids).float().softmax(-1), n)

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> Tensor:
        """Cosine similarity of sentence a[i] with b[i] (N,)."""
        if len(a) != len(b):
            raise ValueError(f"{len(a)} first sentences but {len(b)} second ones")
        ea, eb = self.encode(a, normalize=True), self.encode(b, normalize=True)
        return (ea * eb).sum(-1)
