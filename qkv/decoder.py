"""The decoder: masked self-attention over the tokens so far, cross-attention to the encoder
output, and a feed-forward network; next-token scores come out (the paper, section 3.1, right
half of figure 1). Without cross-attention it is the decoder-only (GPT) block.

Shapes: B batch, T new target positions, P cached positions, S source length, D d_model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import MultiHeadAttention
from .cache import DecoderCache, KVCache
from .embedding import Embeddings
from .layers import FeedForward, Residual
from .masks import causal_mask, combine, left_padding_mask


class DecoderLayer(nn.Module):
    """Masked self-attention, cross-attention (optional), feed-forward; each in a Residual."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float = 0.0,
        activation: str = "relu",
        norm_first: bool = True,
        eps: float = 1e-5,
        cross_attention: bool = True,
        *,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        bias: bool = True,
    ):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, attention_dropout, bias)
        self.attn_residual = Residual(d_model, dropout, norm_first, eps, bias)
        self.cross_attn = (
            MultiHeadAttention(d_model, n_heads, attention_dropout, bias)
            if cross_attention
            else None
        )
        self.cross_residual = (
            Residual(d_model, dropout, norm_first, eps, bias) if cross_attention else None
        )
        self.ff = FeedForward(d_model, d_ff, activation_dropout, activation, bias)
        self.ff_residual = Residual(d_model, dropout, norm_first, eps, bias)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        self_mask: Tensor | None = None,
        *,
        is_causal: bool = False,
        self_cache: KVCache | None = None,
        cross_cache: KVCache | None = None,
    ) -> Tensor:
        """x (B, T, D), memory (B, S, D) -> (B, T, D)."""
        x = self.attn_residual(
            x, lambda h: self.self_attn(h, mask=self_mask, is_causal=is_causal, cache=self_cache)
        )
        if self.cross_attn is not None and self.cross_residual is not None:
            cross = self.cross_attn
            x = self.cross_residual(x, lambda h: cross(h, memory, memory_mask, cache=cross_cache))
        return self.ff_residual(x, self.ff)


class Decoder(nn.Module):
    """Embeddings, N DecoderLayers, a final LayerNorm for pre-LN layers. Cache-aware."""

    def __init__(self, embed: Embeddings, layers: list[DecoderLayer], final_norm: nn.Module | None):
        super().__init__()
        self.embed = embed
        self.layers = nn.ModuleList(layers)
        self.norm = final_norm if final_norm is not None else nn.Identity()

    def start(
        self,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        offsets: Tensor | None = None,
        steps: int = 0,
    ) -> DecoderCache:
        """An empty cache; cross-attention keys/values are projected here, once. `offsets` (B,):
        the first step's tokens are left-padded by that many pads per row. `steps`: the most
        positions the decode may reach, if known (room is reserved for them)."""
        cross, source = None, None
        if memory is not None:
            source = torch.arange(memory.shape[0], device=memory.device)
            cross = []
            for layer in self.layers:
                c = KVCache(static=True)
                c.append(*layer.cross_attn.project_kv(memory))
                cross.append(c)
        own = [KVCache(reserve=steps) for _ in self.layers]
        return DecoderCache(own, cross, memory_mask, source, offsets)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        cache: DecoderCache | None = None,
        tgt_mask: Tensor | None = None,
    ) -> Tensor:
        """tgt ids (B, T) -> hidden states (B, T, D).

        Without a cache, position i sees positions <= i. With a cache holding P positions, the T
        new tokens sit at positions P..P+T-1 and see the cache plus the new tokens up to their own.
        `tgt_mask` (B, 1, 1, P+T) optionally hides target padding keys; a cache with `offsets`
        hides each row's left padding and counts its positions from its first real token.
        """
        past = cache.length if cache is not None else 0
        t = tgt.shape[1]
        offsets = cache.offsets if cache is not None else None
        x = self.embed(tgt, start=past, offsets=offsets)
        # One new token may see every cached key: no causal mask at all. SDPA's is_causal is
        # right only without a cache; with a cache and several tokens, an explicit aligned mask.
        is_causal = past == 0 and tgt_mask is None and offsets is None and t > 1
        self_mask = None
        if t > 1 and not is_causal:
            self_mask = causal_mask(t, past + t, device=tgt.device)
        if offsets is not None:  # left-padded rows: their pads are never keys
            tgt_mask = combine(tgt_mask, left_padding_mask(offsets, t, past + t))
        self_mask = combine(self_mask, tgt_mask)
        if cache is not None:
            memory_mask = cache.memory_mask
        for i, layer in enumerate(self.layers):
            x = layer(
                x,
                memory,
                memory_mask,
                self_mask,
                is_causal=is_causal,
                self_cache=cache.self_attn[i] if cache is not None else None,
                cross_cache=cache.cross_attn[i] if cache is not None and cache.cross_attn else None,
            )
        return self.norm(x)
