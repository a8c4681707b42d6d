"""Attention: each query is compared with every key (dot product), softmax turns the scores into
weights that sum to 1, and the weights mix the values (Vaswani et al. 2017, section 3.2).

Shapes: B batch, H heads, T queries, S keys, D d_model, Dh d_head.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
from .cache import KVCache, per_row
from .dropout import dropout as drop
from .masks import causal_mask, combine

# Called with (module, weights (B, H, T, S)) by a MultiHeadAttention while recording.
Recorder = Callable[["MultiHeadAttention", Tensor], None]


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    is_causal: bool = False,
    dropout: float = 0.0,
    need_weights: bool = False,
    table: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention: softmax(q k^T / sqrt(Dh)) v.

    Args:
        q: (B, H, T, Dh); k, v: (B, H, S, Dh).
        mask: bool, True = may attend, broadcastable to (B, H, T, S).
        is_causal: also hide later keys (top-left aligned, as in SDPA; right only when S == T).
        dropout: dropout on the weights (pass 0.0 at eval time).
        need_weights: run the explicit math and return the weights (B, H, T, S), before dropout.
        table: (B, S) long, where each row's keys lie when k and v are a KVCache's stored rows
            (P, H, S, Dh): key s of row b is k[table[b, s], :, s] (a beam search's cache,
            reordered without copying). None: k and v have one row per row.

    Returns (out (B, H, T, Dh), weights or None). Without weights this is qkv's C++ kernel for
    decoding's few queries per row (qkv/native.py, where it applies), else PyTorch's fused
    kernel (except where `_explicit_is_faster`); all compute the same function
    (tests/test_attention.py checks that they agree).
    """
    if is_causal and mask is not None:  # SDPA takes one or the other, so merge them
        if q.shape[-2] != k.shape[-2]:
            raise ValueError("is_causal with T != S is ambiguous; pass an explicit causal_mask")
        mask = combine(mask, causal_mask(q.shape[-2], k.shape[-2], device=q.device))
        is_causal = False
    if dropout > 0.0 and not need_weights and table is None:  # training: qkv's C++ kernel
        out = native.train_attention(q, k, v, mask, is_causal, dropout)
        if out is not None:
            return out, None
    if not need_weights and dropout == 0.0 and not is_causal:
        out = native.decode_attention(q, k, v, mask, table)
        if out is not None:
            return out, None
    if table is not None:  # PyTorch's kernels take one row of keys per row: gather them
        k, v = per_row(k, table), per_row(v, table)
    if not need_weights and not _explicit_is_faster(q, dropout):
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal
        )
        return out, None

    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if is_causal:
        t, s = q.shape[-2], k.shape[-2]
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril()  # top-left, as SDPA
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)  # fp32 for bf16 inputs
    mixed = drop(weights, dropout) if dropout > 0 else weights
    return mixed @ v, weights if need_weights else None


# The CPU's fused kernel costs more per (row, head) than two plain matmuls when each row has one
# query. bench/attention_speed.py measured (AMD EPYC, AVX2, 8 heads): fused faster at 32 rows
# (greedy over 32 sentences), explicit faster at 160 (beam 5 over 32). The threshold sits between,
# so greedy over 64 sentences also takes the explicit path; rerun the bench on another CPU.
EXPLICIT_MIN_ROWS_X_HEADS = 512


def _explicit_is_faster(q: Tensor, dropout: float) -> bool:
    """On the CPU: with dropout (training), where the fused kernel falls back to PyTorch's own
    math in fp32 and its per-element bernoulli mask (the explicit math with qkv's dropout mask
    ran forward + backward 1.3-1.7x faster in fp32 and 1.4-1.8x in bf16 at training's shapes,
    bench/attention_speed.py --train); or with one query per row over at least
    EXPLICIT_MIN_ROWS_X_HEADS rows x heads (decoding)."""
    if q.device.type != "cpu":
        return False
    if dropout > 0.0:
        return True
    return q.shape[-2] == 1 and q.shape[:-2].numel() >= EXPLICIT_MIN_ROWS_X_HEADS


def _ungroup(x: Tensor, group: int) -> Tensor:
    """(n, H, g*T, X) -> (n*g, H, T, X): undo the grouping of a sentence's beams' queries."""
    n, h, gt, last = x.shape
    return x.view(n, h, group, gt // group, last).transpose(1, 2).reshape(-1, h, gt // group, last)


class MultiHeadAttention(nn.Module):
    """H heads attend in parallel, each in its own Dh = D / H subspace; their outputs are
    concatenated and projected back to D. Self-attention when `memory` is None, else
    cross-attention from x (queries) to memory (keys and values)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads, self.d_head, self.dropout = n_heads, d_model // n_heads, dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        # Observers, set only by qkv.inspect's context managers; None in training and serving.
        self.recorder: Recorder | None = None
        self.head_mask: Tensor | None = None  # (H,) 1 = keep head, 0 = silence it

    def split_heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.d_head).transpose(1, 2)  # (B, H, T, Dh)

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Self-attention's queries, keys and values (B, H, T, Dh) of x (B, T, D), from one
        matmul with the three weights stacked: one larger matmul runs faster than three."""
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        b = None
        if self.q_proj.bias is not None:
            b = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        q, k, v = F.linear(x, w, b).chunk(3, dim=-1)  # (B, T, D) each
        return self.split_heads(q), self.split_heads(k), self.split_heads(v)

    def project_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (B, H, S, Dh) of memory (B, S, D)."""
        return self.split_heads(self.k_proj(memory)), self.split_heads(self.v_proj(memory))

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        mask: Tensor | None = None,
        *,
        is_causal: bool = False,
        cache: KVCache | None = None,
    ) -> Tensor:
        """x (B, T, D) -> (B, T, D).

        Self-attention appends the new keys/values to `cache` when one is given. Cross-attention
        with a static cache projects memory once, on first use, and reuses it afterwards.
        """
        table = None  # a self-attention cache's table of stored rows (KVCache), if any
        if cache is not None and cache.static:  # cross-attention, keys/values kept
            q = self.split_heads(self.q_proj(x))  # (B, H, T, Dh)
            if not cache.length:
                assert memory is not None, "an empty cross-attention cache needs memory"
                cache.append(*self.project_kv(memory))
            k, v = cache.k, cache.v
        elif memory is not None:  # cross-attention
            q = self.split_heads(self.q_proj(x))
            k, v = self.project_kv(memory)
        else:  # self-attention
            q, k, v = self.project_qkv(x)
            if cache is not None:  # stored keys/values (P, H, S, Dh), S = cached + T
                k, v, table = cache.append(k, v)

        group = cache.group if cache is not None and cache.static else 1
        if group > 1:  # a sentence's beams share its keys: its g rows' queries become g*T queries
            n, h, t, dh = q.shape
            q = q.view(n // group, group, h, t, dh).transpose(1, 2).reshape(-1, h, group * t, dh)

        need_weights = self.recorder is not None
        out, weights = attention(
            q,
            k,
            v,
            mask,
            is_causal=is_causal,
            dropout=self.dropout if self.training else 0.0,
            need_weights=need_weights,
            table=table,
        )
        if group > 1:  # back to one row per beam: (N, H, T, ...)
            out = _ungroup(out, group)
            weights = _ungroup(weights, group) if weights is not None else None
        if self.recorder is not None and weights is not None:
            self.recorder(self, weights)
        if self.head_mask is not None:
            out = out * self.head_mask.to(out)[None, :, None, None]
        b, _, t, _ = out.shape
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.d_head)  # (B, T, D)
        return self.out_proj(out)
