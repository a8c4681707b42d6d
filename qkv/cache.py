"""The KV cache: keys and values of earlier positions, kept so each decoding step only computes
the new token's query, key and value.

The caller owns the cache (search creates it with `model.start(...)` and passes it to every
`model.step(...)`); nothing is stored on modules, so one model can serve many decodes at once.

Shapes: B rows (sentences, or sentences x beams), H heads, S cached positions, Dh d_head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


class KVCache:
    """Keys and values of one attention layer, (B, H, S, Dh) each, growing along S.

    Storage is preallocated and doubled when full, so appending one token is a copy of that token
    only (torch.cat would copy the whole history every step).
    """

    def __init__(self, static: bool = False) -> None:
        self.static = static  # cross-attention: filled once from the encoder output, then reused
        self._k: Tensor | None = None
        self._v: Tensor | None = None
        self.length = 0

    @property
    def k(self) -> Tensor:
        assert self._k is not None, "empty cache"
        return self._k[:, :, : self.length]

    @property
    def v(self) -> Tensor:
        assert self._v is not None, "empty cache"
        return self._v[:, :, : self.length]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add T new positions (B, H, T, Dh); return all keys and values so far (B, H, S, Dh)."""
        t = k.shape[2]
        if self._k is None or self.length + t > self._k.shape[2]:
            # cross-attention keys/values never grow: no spare room to copy on every reorder
            self._grow(k, v, self.length + t if self.static else max(2 * (self.length + t), 16))
        assert self._k is not None and self._v is not None
        self._k[:, :, self.length : self.length + t] = k
        self._v[:, :, self.length : self.length + t] = v
        self.length += t
        return self.k, self.v

    def _grow(self, k: Tensor, v: Tensor, capacity: int) -> None:
        b, h, _, dh = k.shape
        new_k = k.new_empty(b, h, capacity, dh)
        new_v = v.new_empty(b, h, capacity, v.shape[-1])
        if self._k is not None and self._v is not None and self.length:
            new_k[:, :, : self.length] = self.k
            new_v[:, :, : self.length] = self.v
        self._k, self._v = new_k, new_v

    def select(self, index: Tensor) -> None:
        """Keep batch rows `index` (B',), in that order: beam search's reorder."""
        if self._k is not None and self._v is not None:
            # The whole buffer, spare capacity included, so the next append need not grow it.
            self._k = self._k.index_select(0, index)
            self._v = self._v.index_select(0, index)


@dataclass
class DecoderCache:
    """Everything a decoder needs between steps: per-layer self-attention caches (growing),
    per-layer cross-attention keys/values (projected once from the encoder output), and the
    memory padding mask. `select` reorders all of it at once.

    `source` (B,) says which source sentence each row decodes. Beam search's reorder moves rows
    only among the beams of one sentence, whose cross-attention keys/values are equal, so a
    select that leaves `source` unchanged skips them; only dropping or repeating sentences moves
    them (HF transformers and fairseq make the same saving).
    """

    self_attn: list[KVCache]
    cross_attn: list[KVCache] | None = None
    memory_mask: Tensor | None = None  # (B, 1, 1, S)
    source: Tensor | None = None  # (B,)
    offsets: Tensor | None = None  # (B,) left pads before each row's first token (prompts)

    @property
    def length(self) -> int:
        """How many target positions are cached."""
        return self.self_attn[0].length

    def select(self, index: Tensor) -> None:
        for c in self.self_attn:
            c.select(index)
        if self.offsets is not None:
            self.offsets = self.offsets[index]
        if self.source is not None:
            source = self.source[index]
            if torch.equal(source, self.source):  # rows moved only among equal sources
                return
            self.source = source
        for c in self.cross_attn or []:
            c.select(index)
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask.index_select(0, index)
