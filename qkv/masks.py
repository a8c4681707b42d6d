"""Attention masks: bool tensors, True = this query may attend to this key.

That is the convention of `torch.nn.functional.scaled_dot_product_attention` (and the opposite
of `torch.nn.Transformer`). Every mask broadcasts to (B, H, T, S). We only ever mask keys, so no
query row is fully masked (a fully masked row would give NaN after softmax).
"""

from __future__ import annotations

import torch
from torch import Tensor


def padding_mask(ids: Tensor, pad_id: int) -> Tensor:
    """Key padding mask from token ids (B, S) -> (B, 1, 1, S): True on real tokens."""
    return (ids != pad_id)[:, None, None, :]


def causal_mask(t: int, s: int | None = None, *, device: torch.device | None = None) -> Tensor:
    """(T, S) mask where query i sees keys up to its own position.

    The T queries are the *last* T positions of the S keys (bottom-right alignment), which is what
    decoding with a KV cache needs: S - T earlier positions are already in the cache. Without a
    cache S == T and this is the usual lower triangle. (SDPA's `is_causal` aligns top-left, which
    is only right when S == T.)
    """
    s = t if s is None else s
    if s < t:
        raise ValueError(f"causal_mask: {t} queries cannot be the last positions of {s} keys")
    q_pos = torch.arange(s - t, s, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(s, device=device)[None, :]  # (1, S)
    return k_pos <= q_pos


def combine(*masks: Tensor | None) -> Tensor | None:
    """Logical AND of the masks that are given (None means attend everywhere)."""
    out = None
    for m in masks:
        if m is not None:
            out = m if out is None else out & m
    return out


def left_padding_mask(offsets: Tensor, t: int, s: int) -> Tensor:
    """(B, 1, T, S) for rows left-padded by `offsets` (B,) pads: the last T of S positions attend
    to real keys (position >= the row's offset), and a padding query to itself as well, so that
    no row is fully masked (its output is never used: padding is never a key for a real query).
    """
    k_pos = torch.arange(s, device=offsets.device)
    real = k_pos[None, :] >= offsets[:, None]  # (B, S)
    own = k_pos[None, :] == torch.arange(s - t, s, device=offsets.device)[:, None]  # (T, S)
    return (real[:, None, :] | own[None, :, :])[:, None]  # (B, 1, T, S)
