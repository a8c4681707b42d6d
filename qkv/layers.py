"""The pieces every Transformer layer shares: the position-wise feed-forward network and the
skip connection with layer norm around each sublayer (the paper, sections 3.1 and 3.3).

Shapes: x (..., D); every piece maps (..., D) to (..., D), with D d_model and F d_ff inside.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from . import native
from .dropout import Dropout, add_dropout, relu_dropout

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
}


class FeedForward(nn.Module):
    """Two linear maps with a nonlinearity between, applied to each position alone. `dropout`
    acts on the hidden activations (fairseq's activation_dropout)."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        dropout: float = 0.0,
        activation: str = "relu",
        bias: bool = True,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.fc1 = nn.Linear(d_model, d_ff, bias=bias)
        self.fc2 = nn.Linear(d_ff, d_model, bias=bias)
        self.activation = ACTIVATIONS[activation]
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.activation is F.relu:  # one pass for both, in training on the CPU
            return self.fc2(relu_dropout(self.fc1(x), self.dropout.p, self.training))
        return self.fc2(self.dropout(self.activation(self.fc1(x))))


class Residual(nn.Module):
    """The skip connection plus layer norm around one sublayer, written once.

    post-LN (the paper): norm(x + sublayer(x)).  pre-LN (norm_first): x + sublayer(norm(x)),
    which keeps an unnormalised path from input to output and trains more stably without warmup.
    Ablations (qkv.inspect sets these, only inside its context managers): `skip = False`
    removes the skip connection; `bypass = True` removes the whole sublayer, so only the skip
    connection carries x through.
    """

    def __init__(
        self,
        d_model: int,
        dropout: float = 0.0,
        norm_first: bool = True,
        eps: float = 1e-5,
        bias: bool = True,
    ):
        super().__init__()
        self.norm = nn.LayerNorm(d_model, eps=eps, bias=bias)
        self.dropout = Dropout(dropout)
        self.norm_first = norm_first
        self.skip = True
        self.bypass = False

    def forward(self, x: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        if self.bypass:
            return x
        if self.norm_first:  # under bf16 autocast the norm writes bf16, where it can
            h = native.layer_norm_bf16(x, self.norm) if self.training else None
            y = sublayer(self.norm(x) if h is None else h)
            if not self.skip:
                return self.dropout(y)
            return add_dropout(x, y, self.dropout.p, self.training)  # one pass in training
        skip = x if self.skip else 0.0
        y = self.dropout(sublayer(x))
        if self.skip:  # inference on the CPU: add and norm in one C++ call, where it applies
            fused = native.add_layer_norm(x, y, self.norm)
            if fused is not None:
                return fused
        return self.norm(skip + y)
