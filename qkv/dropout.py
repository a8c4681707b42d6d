"""Dropout (Srivastava et al. 2014): during training, zero each element with probability p and
scale the rest by 1 / (1 - p), so the expected value is unchanged; at inference, the identity.
A faster CPU mask than PyTorch's lives here, apart from the concept code that uses it.
"""

from __future__ import annotations

import struct

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout: zero each element with probability p, scale the rest by 1 / (1 - p).

    The same function as F.dropout. On the CPU the mask is cut from 64-bit random integers, four
    16-bit draws each: PyTorch's CPU bernoulli draws one number per element and costs about twice
    as much (bench/dropout_speed.py). The mask, scaled, is applied as one multiplication, whose
    backward is one multiplication too (cheaper than torch.where's). p is rounded to a multiple
    of 1/65536, and in bf16 moved a little further (`cut_and_scale`).
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    n = x.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
    bits = words.view(torch.int16)[:n].view(x.shape)  # uniform over [-32768, 32767]
    cut, scale = cut_and_scale(p, x.dtype)  # drop when bits < -32768 + cut
    return x * (bits >= cut - 32768).to(x.dtype).mul_(scale)


def cut_and_scale(p: float, dtype: torch.dtype) -> tuple[int, float]:
    """The mask's cut (an element is dropped with probability cut / 65536) and the kept
    elements' scale, with scale x (1 - cut / 65536) = 1, so the mean is kept.

    In fp32, cut = round(p * 65536) and scale = 65536 / (65536 - cut). In bf16 (autocast
    training) that scale has no exact value (1/0.9 rounds to 1.109375, which would shrink every
    kept value by 0.16%), so the scale is rounded first and the cut moved to match it: p = 0.1
    becomes 0.0986, the mean is kept to 5e-6, and the scaled mask is exact in x's own dtype,
    one multiplication instead of two (forward and backward)."""
    cut = round(p * 65536)
    scale = 65536 / (65536 - cut)
    if dtype in (torch.bfloat16, torch.float16):
        scale = _rounded(scale, dtype)
        cut = round(65536 * (1 - 1 / scale))
    return cut, scale


def _rounded(x: float, dtype: torch.dtype) -> float:
    """x rounded to the nearest fp16 or bf16 value (ties to even), in plain Python: no tensor,
    so torch.compile traces dropout without a break."""
    x = struct.unpack("<f", struct.pack("<f", x))[0]  # via fp32, as torch's .to(dtype) rounds
    if dtype == torch.float16:
        return struct.unpack("<e", struct.pack("<e", x))[0]
    bits = struct.unpack("<I", struct.pack("<f", x))[0]  # bf16: fp32's upper 16 bits
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return struct.unpack("<f", struct.pack("<I", bits))[0]


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
