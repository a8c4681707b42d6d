"""Token embeddings and positional information.

Attention by itself is blind to order, so each token's vector gets its position added: fixed
sinusoids (the paper, section 3.5) or a learned vector per position.

Shapes: token ids (B, T) -> vectors (B, T, D), D d_model; positions start at `start` (cached ones).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .dropout import Dropout


def sinusoids(max_len: int, d_model: int) -> Tensor:
    """(max_len, D) table: sin(pos / 10000^(2i/D)) in the first half, cos in the second.

    The paper interleaves sin and cos; concatenating them (as fairseq and Marian do) is the same
    set of features in another order, and lets us load Marian checkpoints unchanged.
    """
    half = d_model // 2
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]  # (L, 1)
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) * 2 / d_model)
    table = torch.zeros(max_len, d_model, dtype=torch.float64)
    table[:, :half] = torch.sin(pos * freq)
    table[:, half : 2 * half] = torch.cos(pos * freq)
    return table.float()


class Embeddings(nn.Module):
    """ids (B, T) -> vectors (B, T, D): token embedding (x sqrt(D)) + position, then dropout.

    `token` is passed in so that one matrix can serve encoder, decoder and output projection.
    """

    def __init__(
        self,
        token: nn.Embedding,
        max_len: int,
        positions: str = "sinusoidal",
        dropout: float = 0.0,
        scale: bool = True,
    ):
        super().__init__()
        self.token = token
        d_model = token.embedding_dim
        self.scale = math.sqrt(d_model) if scale else 1.0
        self.max_len = max_len
        if positions == "sinusoidal":
            self.register_buffer("sinusoids", sinusoids(max_len, d_model), persistent=False)
            self.learned = None
        elif positions == "learned":
            self.learned = nn.Embedding(max_len, d_model)
            # the same scale as the token embeddings it is added to (nn.Embedding's N(0, 1)
            # would drown unscaled ones)
            nn.init.normal_(self.learned.weight, std=1.0 if scale else d_model**-0.5)
        else:
            raise ValueError(f"unknown positions {positions!r}")
        self.dropout = Dropout(dropout)

    def forward(self, ids: Tensor, start: int = 0, offsets: Tensor | None = None) -> Tensor:
        """`start`: position of ids[:, 0] (the number of tokens already in a KV cache).
        `offsets` (B,): rows left-padded by that many pads, whose positions count from their
        first real token (pads get position 0)."""
        t = ids.shape[1]
        table = self.learned.weight if self.learned is not None else self.sinusoids
        if offsets is not None:
            pos_ids = torch.arange(start, start + t, device=ids.device)[None, :] - offsets[:, None]
            if int(pos_ids.max()) >= self.max_len:
                raise ValueError(f"position {int(pos_ids.max())} exceeds max_len {self.max_len}")
            pos = table[pos_ids.clamp_min(0)]  # (B, T, D)
        elif start + t > self.max_len:
            raise ValueError(f"sequence of {start + t} positions exceeds max_len {self.max_len}")
        else:
            pos = table[start : start + t]
        x = self.token(ids)
        if self.scale != 1.0:
            x = x * self.scale
        return self.dropout(x + pos)  # (B, T, D)

    def at(self, ids: Tensor, position: Tensor) -> Tensor:
        """ids (B, 1) all at one position given as a tensor (1,), so that a compiled decoding
        step sees the same code at every position (qkv.fixed)."""
        table = self.learned.weight if self.learned is not None else self.sinusoids
        x = self.token(ids)
        if self.scale != 1.0:
            x = x * self.scale
        return self.dropout(x + table.index_select(0, position))  # (B, 1, D)
