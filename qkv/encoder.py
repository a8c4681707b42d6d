"""The encoder: a sentence in, one vector per token out, each built by attending to the whole
sentence (the paper, section 3.1, left half of figure 1).

Shapes: B batch, S source length, D d_model.
"""

from __future__ import annotations

from torch import Tensor, nn

from .attention import MultiHeadAttention
from .embedding import Embeddings
from .layers import FeedForward, Residual


class EncoderLayer(nn.Module):
    """Self-attention over the whole input, then a feed-forward network, each in a Residual."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float = 0.0,
        activation: str = "relu",
        norm_first: bool = True,
        eps: float = 1e-5,
        *,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        bias: bool = True,
    ):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, attention_dropout, bias)
        self.ff = FeedForward(d_model, d_ff, activation_dropout, activation, bias)
        self.attn_residual = Residual(d_model, dropout, norm_first, eps, bias)
        self.ff_residual = Residual(d_model, dropout, norm_first, eps, bias)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (B, S, D), mask (B, 1, 1, S) True on real tokens -> (B, S, D)."""
        x = self.attn_residual(x, lambda h: self.self_attn(h, mask=mask))
        return self.ff_residual(x, self.ff)


class Encoder(nn.Module):
    """Embeddings, then N EncoderLayers; a final LayerNorm when the layers are pre-LN (their
    output is otherwise never normalised)."""

    def __init__(self, embed: Embeddings, layers: list[EncoderLayer], final_norm: nn.Module | None):
        super().__init__()
        self.embed = embed
        self.layers = nn.ModuleList(layers)
        self.norm = final_norm if final_norm is not None else nn.Identity()

    def forward(self, src: Tensor, mask: Tensor | None = None) -> Tensor:
        """src ids (B, S), mask (B, 1, 1, S) -> memory (B, S, D)."""
        x = self.embed(src)
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x)
