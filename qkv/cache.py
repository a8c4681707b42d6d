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
        # Cross-attention: each cached row serves `group` consecutive query rows (one sentence's
        # beams), so a sentence's keys/values are stored and read once, not once per beam.
        self.group = 1

    @property
    def rows(self) -> int:
        return 0 if self._k is None else self._k.shape[0]

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
        """Keep batch rows `index` (B',), in that order: beam search's reorder. Only the used
        positions are copied, into a buffer as large as before (the next append need not grow)."""
        if self._k is None or self._v is None:
            return
        if self._k.requires_grad and torch.is_grad_enabled():  # out= does not differentiate
            self._k, self._v = self._k.index_select(0, index), self._v.index_select(0, index)
            return
        new_k = self._k.new_empty(len(index), *self._k.shape[1:])
        new_v = self._v.new_empty(len(index), *self._v.shape[1:])
        torch.index_select(self.k, 0, index, out=new_k[:, :, : self.length])
        torch.index_select(self.v, 0, index, out=new_v[:, :, : self.length])
        self._k, self._v = new_k, new_v


@dataclass
class DecoderCache:
    """Everything a decoder needs between steps: per-layer self-attention caches (growing),
    per-layer cross-attention keys/values (projected once from the encoder output), and the
    memory padding mask. `select` reorders all of it at once.

    The cross-attention caches and `memory_mask` hold one row per source sentence; `source` (N,)
    says which of them each decoder row reads. While the rows come in equal consecutive groups
    per sentence (beam search: a sentence's K beams, which only ever move among themselves),
    the K beams share their sentence's row (`KVCache.group` = K): nothing is copied K times at
    the start, a reorder among beams moves nothing, and cross-attention reads each sentence's
    keys once for all its beams. Only dropping sentences moves them.
    """

    self_attn: list[KVCache]
    cross_attn: list[KVCache] | None = None
    memory_mask: Tensor | None = None  # (sentences, 1, 1, S)
    source: Tensor | None = None  # (N,) the cross-attention row of each decoder row
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
        if self.source is None or not self.cross_attn:
            return
        source = self.source[index]
        rows, group = _groups(source)
        n = self.cross_attn[0].rows
        unchanged = len(rows) == n and bool((rows == torch.arange(n, device=rows.device)).all())
        for c in self.cross_attn:
            if not unchanged:
                c.select(rows)
            c.group = group
        if self.memory_mask is not None and not unchanged:
            self.memory_mask = self.memory_mask.index_select(0, rows)
        self.source = torch.arange(len(rows), device=source.device).repeat_interleave(group)


def _groups(source: Tensor) -> tuple[Tensor, int]:
    """Rows (n,) and a group size g with source == rows.repeat_interleave(g), rows distinct; or
    (source, 1) when source is not made of equal runs of distinct values."""
    rows, counts = torch.unique_consecutive(source, return_counts=True)
    g = int(counts[0]) if len(counts) else 1
    if g > 1 and bool((counts == g).all()) and len(torch.unique(rows)) == len(rows):
        return rows, g
    return source, 1
