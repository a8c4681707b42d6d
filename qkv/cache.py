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

from . import native


class KVCache:
    """Keys and values of one attention layer, (B, H, S, Dh) each, growing along S.

    Storage is preallocated and doubled when full, so appending one token is a copy of that token
    only (torch.cat would copy the whole history every step). Where qkv's attention kernel reads
    the cache (qkv/native.py: the CPU, fp32, no gradients), a reorder (beam search's `select`)
    copies no keys either: the rows are "stored rows", and a small table (B, capacity) says which
    stored row holds each row's key and value at each position. A row's new keys always go to
    its own stored row (`b`), at positions no row has written yet, so a sentence's beams share
    the history they have in common. When the storage grows, the stored rows are copied as they
    are and the table keeps pointing into them (gathering each row's history into place cost
    a beam search 4 ms per layer at the growth, bench/README.md). Elsewhere a reorder copies
    the rows. `k` and `v` give the keys and values per row; attention reads the stored rows
    through the table (`stored`).
    """

    def __init__(self, static: bool = False, reserve: int = 0) -> None:
        self.static = static  # cross-attention: filled once from the encoder output, then reused
        # Positions to make room for at the first append: a search that knows how long it may
        # run (qkv.translate) reserves them, so the storage never grows (a growth copies every
        # key: 2.9 ms per layer's keys for beam 5 over 32 sentences at 16 positions,
        # bench/README.md). Room reserved but never written costs no memory: the pages of a
        # position are touched when it is written.
        self.reserve = reserve
        self._k: Tensor | None = None  # (P, H, capacity, Dh): P stored rows
        self._v: Tensor | None = None
        self._table: Tensor | None = None  # (B, capacity) long; None: row b in stored row b
        self.length = 0
        # Cross-attention: each cached row serves `group` consecutive query rows (one sentence's
        # beams), so a sentence's keys/values are stored and read once, not once per beam.
        self.group = 1

    @property
    def rows(self) -> int:
        """B, the rows the cache holds keys for."""
        if self._table is not None:
            return self._table.shape[0]
        return 0 if self._k is None else self._k.shape[0]

    @property
    def k(self) -> Tensor:
        """Keys (B, H, S, Dh), one row per row."""
        assert self._k is not None, "empty cache"
        return per_row(self._k[:, :, : self.length], self.table)

    @property
    def v(self) -> Tensor:
        assert self._v is not None, "empty cache"
        return per_row(self._v[:, :, : self.length], self.table)

    @property
    def table(self) -> Tensor | None:
        """(B, S): the stored row holding row b's key at position s; None: stored row b."""
        return None if self._table is None else self._table[:, : self.length]

    def stored(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """Keys and values as stored (P, H, S, Dh), and the table (B, S) or None."""
        assert self._k is not None and self._v is not None, "empty cache"
        s = self.length
        return self._k[:, :, :s], self._v[:, :, :s], self.table

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Add T new positions (B, H, T, Dh); return `stored()`: all keys and values so far."""
        b, t = k.shape[0], k.shape[2]
        k_store, v_store, _, position = self.room(b, t, k)
        k_store[:b, :, position : position + t] = k  # row b's own stored row: free from here on
        v_store[:b, :, position : position + t] = v
        return self.stored()

    def room(self, b: int, t: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor | None, int]:
        """Claim T new positions for B rows of keys and values like `like` (., H, ., Dh):
        the storage of keys and of values (P, H, capacity, Dh), grown if need be, the table
        (B, capacity) or None, and the first new position. The caller writes row b's new keys
        and values into stored row b at the positions claimed (`append` does, and so does
        qkv's C++ decoder step, qkv/csrc/decoder_step.cpp); the cache counts them as held."""
        if self._k is not None and b != self.rows:
            raise ValueError(f"the cache holds {self.rows} rows, not {b}")
        if self._k is None or self.length + t > self._k.shape[2] or b > self._k.shape[0]:
            # cross-attention keys/values never grow: no spare room to copy on every reorder
            capacity = self.length + t if self.static else max(2 * (self.length + t), 16)
            capacity = max(capacity, self.reserve, 0 if self._k is None else self._k.shape[2])
            self._grow(like, capacity, b)
        assert self._k is not None and self._v is not None
        position, self.length = self.length, self.length + t
        if self._table is not None:
            self._table[:, position : self.length] = torch.arange(b, device=like.device)[:, None]
        return self._k, self._v, self._table, position

    def _grow(self, like: Tensor, capacity: int, rows: int) -> None:
        """New storage of `capacity` positions and at least `rows` stored rows (a reorder may
        have made more rows than are stored: beam search's first): the stored rows copied as
        they are, the positions in use only; the table, if any, widened and still valid."""
        p = max(rows, self._k.shape[0] if self._k is not None else 0)
        new_k = storage(like, p, capacity)
        new_v = storage(like, p, capacity)
        if self._k is not None and self._v is not None and self.length:
            new_k[: self._k.shape[0], :, : self.length] = self._k[:, :, : self.length]
            new_v[: self._v.shape[0], :, : self.length] = self._v[:, :, : self.length]
        if self._table is not None:
            table = self._table.new_empty(self._table.shape[0], capacity)
            table[:, : self.length] = self._table[:, : self.length]
            self._table = table
        self._k, self._v = new_k, new_v

    def _rows_in_place(self) -> None:
        """Each row's keys and values copied into its own stored row and the table dropped:
        what PyTorch's kernels read (one row of keys per row)."""
        assert self._k is not None and self._v is not None
        new_k = storage(self._k, self.rows, self._k.shape[2])
        new_v = storage(self._v, self.rows, self._v.shape[2])
        new_k[:, :, : self.length] = self.k
        new_v[:, :, : self.length] = self.v
        self._k, self._v, self._table = new_k, new_v, None

    def select(self, index: Tensor) -> None:
        """Keep rows `index` (B',), in that order: beam search's reorder. Only the table moves
        where the attention kernel reads it; elsewhere, and in cross-attention caches (moved
        only when sentences leave), the rows are copied: only the positions used, into a buffer
        as large as before (the next append need not grow)."""
        if self._k is None or self._v is None:
            return
        if self._k.requires_grad and torch.is_grad_enabled():  # out= does not differentiate
            self._k, self._v = self.k.index_select(0, index), self.v.index_select(0, index)
            self._table = None
            return
        if self.static or not native.reads_tables(self._k):
            if self._table is not None:  # rows in place first (the kernel was switched off)
                self._rows_in_place()
            new_k = storage(self._k, len(index), self._k.shape[2])
            new_v = storage(self._v, len(index), self._v.shape[2])
            torch.index_select(self.k, 0, index, out=new_k[:, :, : self.length])
            torch.index_select(self.v, 0, index, out=new_v[:, :, : self.length])
            self._k, self._v = new_k, new_v
            return
        if self._table is None:
            p, capacity = self._k.shape[0], self._k.shape[2]
            self._table = torch.arange(p, device=index.device)[:, None].expand(p, capacity)
        self._table = self._table.index_select(0, index)


def storage(like: Tensor, rows: int, capacity: int) -> Tensor:
    """Room for `rows` rows of `capacity` positions of keys (or values) shaped like `like`
    (., H, ., Dh): seen as (rows, H, capacity, Dh), laid out position-major per row (rows,
    capacity, H, Dh). An append then writes each row's new position as one contiguous block of
    H x Dh, where head-major storage scattered it over H places a capacity apart: at beam 5 over
    32 sentences, 1,280 places per layer's keys at every step, and the append was among the
    largest operators in a profile of beam search (bench/README.md). The attention kernel reads
    any strides."""
    _, h, _, dh = like.shape
    return like.new_empty(rows, capacity, h, dh).transpose(1, 2)


def per_row(x: Tensor, table: Tensor | None) -> Tensor:
    """Stored rows x (P, H, S, X) read through a table (B, S) of stored rows: (B, H, S, X)."""
    if table is None:
        return x
    positions = torch.arange(x.shape[2], device=x.device)
    return x[table, :, positions].transpose(1, 2)  # (B, S, H, X) -> (B, H, S, X)


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
