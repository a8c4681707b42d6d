"""Dropout (Srivastava et al. 2014): during training, zero each element with probability p and
scale the rest by 1 / (1 - p), so the expected value is unchanged; at inference, the identity.
A faster CPU mask than PyTorch's lives here, apart from the concept code that uses it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout: zero each element with probability p, scale the rest by 1 / (1 - p).

    The same function as F.dropout. On the CPU each element's fate is a 16-bit random draw:
    PyTorch's CPU bernoulli draws one number per element and costs about twice as much
    (bench/dropout_speed.py). The draws come from qkv's C++ mask (qkv/native.py: one pass,
    seeded from PyTorch's generator) where it applies, else from 64-bit random integers cut in
    four (`torch_mask`). The mask, scaled, is applied as one multiplication, whose backward is
    one multiplication too (cheaper than torch.where's). p is rounded to a multiple of 1/65536,
    and in bf16 moved a little further (`cut_and_scale`).
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    cut, scale = cut_and_scale(p, x.dtype)
    mask = native.dropout_mask(x, cut, scale)
    return x * (mask if mask is not None else torch_mask(x, cut, scale))


class _ReluDropout(torch.autograd.Function):
    """relu(x) * mask in one pass (csrc/dropout_fused.cpp); backward from the output alone."""

    @staticmethod
    def forward(ctx, module, x, cut, scale, seed):
        y = module.relu_dropout(x, cut, scale, seed)
        ctx.save_for_backward(y)
        ctx.module, ctx.scale = module, scale
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        dx = ctx.module.relu_dropout_backward(dy.contiguous(), y, ctx.scale)
        return None, dx, None, None, None


class _AddDropout(torch.autograd.Function):
    """x + y * mask in one pass (csrc/dropout_fused.cpp); the mask made again for y's gradient."""

    @staticmethod
    def forward(ctx, module, x, y, cut, scale, seed):
        ctx.module, ctx.args, ctx.dtype = module, (cut, scale, seed), y.dtype
        return module.add_dropout(x, y, cut, scale, seed)

    @staticmethod
    def backward(ctx, dout):
        dy = ctx.module.add_dropout_backward(dout.contiguous(), *ctx.args, ctx.dtype)
        return None, dout, dy, None, None, None


def relu_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """dropout(relu(x), p): the feed-forward's hidden units. One pass each way on the CPU
    (where the kernels apply), with the mask `dropout` would draw and the same result."""
    module = native.fused_dropouts(x) if training and p > 0.0 else None
    if module is None:
        return dropout(F.relu(x), p, training)
    cut, scale = cut_and_scale(p, x.dtype)
    return _ReluDropout.apply(module, x, cut, scale, native.seed())


def add_dropout(x: Tensor, y: Tensor, p: float, training: bool = True) -> Tensor:
    """x + dropout(y, p): a skip connection's sum. One pass each way on the CPU where x is fp32
    (the residual stream) and y fp32 or bf16 (a sublayer's output under autocast), with the mask
    `dropout` would draw and the same result."""
    takes = training and p > 0.0 and x.dtype == torch.float32 and x.shape == y.shape
    module = native.fused_dropouts(x, y) if takes else None
    if module is None:
        return x + dropout(y, p, training)
    cut, scale = cut_and_scale(p, y.dtype)
    return _AddDropout.apply(module, x, y, cut, scale, native.seed())


def torch_mask(
    x: Tensor, cut: int, scale: float, generator: torch.Generator | None = None
) -> Tensor:
    """Dropout's mask like x from PyTorch's generator (the default one unless given): 64-bit
    random integers, four 16-bit draws each; `scale` where a draw is at least the cut, else 0
    (dropped with probability cut / 65536)."""
    n = x.numel()
    words = torch.randint(
        -(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, generator=generator
    )
    bits = words.view(torch.int16)[:n].view(x.shape)  # uniform over [-32768, 32767]
    return (bits >= cut - 32768).to(x.dtype).mul_(scale)


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
    """x rounded to the nearest fp16 or bf16 value (ties to even) via fp32, as torch's
    .to(dtype) rounds; in plain Python arithmetic, no tensor and no struct, so torch.compile
    folds it to a constant (its dynamo died of a RecursionError tracing struct.pack)."""
    x = _round_bits(x, 24, -125)  # fp32: 24 significant bits, smallest normal 2^-126
    if dtype == torch.float16:
        return _round_bits(x, 11, -13, 65504.0)
    return _round_bits(x, 8, -125)  # bf16: fp32's exponent, 8 significant bits


def _round_bits(x: float, bits: int, min_exp: int, largest: float = math.inf) -> float:
    """x to `bits` significant bits, ties to even (Python's round); below 2^(min_exp - 1), the
    smallest normal number, the subnormals' fixed step; beyond `largest`, infinity."""
    if x == 0 or not math.isfinite(x):
        return x
    step = max(math.frexp(x)[1], min_exp) - bits  # x = m 2^e, 0.5 <= |m| < 1
    y = math.ldexp(round(math.ldexp(x, -step)), step)
    return y if abs(y) <= largest else math.copysign(math.inf, y)


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
