"""The pieces every Transformer layer shares: the position-wise feed-forward network and the
skip connection with layer norm around each sublayer (the paper, sections 3.1 and 3.3)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
}


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout: zero each element with probability p, scale the rest by 1 / (1 - p).

    The same function as F.dropout. On the CPU the mask is cut from 64-bit random integers, four
    16-bit draws each: PyTorch's CPU bernoulli draws one number per element and costs about twice
    as much (bench/dropout_speed.py). p is rounded to a multiple of 1/65536.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    n = x.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
    bits = words.view(torch.int16)[:n].view(x.shape)  # uniform over [-32768, 32767]
    cut = round(p * 65536)  # drop when bits < -32768 + cut: probability cut / 65536
    keep = bits >= cut - 32768
    return torch.where(keep, x * (65536 / (65536 - cut)), 0.0)


class Dropout(nn.Module):
    """`dropout` as a module (active in training mode only)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class FeedForward(nn.Module):
    """Two linear maps with a nonlinearity between, applied to each position alone. `dropout`
    acts on the hidden activations (fairseq's activation_dropout)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, activation: str = "relu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.activation = ACTIVATIONS[activation]
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
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
        self, d_model: int, dropout: float = 0.0, norm_first: bool = True, eps: float = 1e-5
    ):
        super().__init__()
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.dropout = Dropout(dropout)
        self.norm_first = norm_first
        self.skip = True
        self.bypass = False

    def forward(self, x: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        if self.bypass:
            return x
        skip = x if self.skip else 0.0
        if self.norm_first:
            return skip + self.dropout(sublayer(self.norm(x)))
        return self.norm(skip + self.dropout(sublayer(x)))
