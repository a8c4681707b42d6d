"""Look inside a model while it runs: record every head's attention weights, silence heads.

These are observers that opt in for the duration of a `with` block; forward signatures do not
change and training, which never enters these blocks, always runs the fused kernel.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .attention import MultiHeadAttention
from .layers import Residual


def attention_modules(model: nn.Module) -> dict[str, MultiHeadAttention]:
    """Every MultiHeadAttention in the model, keyed by module path
    (e.g. 'decoder.layers.0.cross_attn')."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MultiHeadAttention)}


class AttentionRecording(dict[str, list[Tensor]]):
    """module path -> weights (B, H, T, S) of each call, in call order (one per decoding step
    when generating with a cache)."""

    def last(self, path: str) -> Tensor:
        return self[path][-1]


@contextmanager
def record_attention(model: nn.Module, *, to_cpu: bool = False) -> Iterator[AttentionRecording]:
    """Capture the attention weights of every layer and head while the block runs.

    with record_attention(model) as rec:
        model(src, tgt)
    rec["encoder.layers.0.self_attn"][0]  # (B, H, S, S), rows sum to 1
    """
    rec = AttentionRecording()
    modules = attention_modules(model)
    names = {id(m): n for n, m in modules.items()}

    def recorder(module: MultiHeadAttention, weights: Tensor) -> None:
        w = weights.detach()
        rec.setdefault(names[id(module)], []).append(w.cpu() if to_cpu else w)

    for m in modules.values():
        if m.recorder is not None:
            raise RuntimeError("record_attention: this model is already being recorded")
        m.recorder = recorder
    try:
        yield rec
    finally:
        for m in modules.values():
            m.recorder = None


@contextmanager
def mask_heads(model: nn.Module, heads: dict[str, Iterable[int]]) -> Iterator[None]:
    """Silence heads while the block runs: {attention module path: [head indices]}. A silenced
    head's output is zero before the output projection, so it contributes nothing."""
    modules = attention_modules(model)
    for path, idx in heads.items():
        if path not in modules:
            raise KeyError(f"no attention module {path!r}")
        m = modules[path]
        mask = torch.ones(m.n_heads)
        mask[list(idx)] = 0.0
        m.head_mask = mask
    try:
        yield
    finally:
        for m in modules.values():
            m.head_mask = None


def residuals(model: nn.Module, under: str = "") -> dict[str, Residual]:
    """Every Residual (skip connection + LayerNorm) at or under module path `under`."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, Residual) and (not under or n == under or n.startswith(under + "."))
    }


@contextmanager
def ablate(
    model: nn.Module, *, bypass: Iterable[str] = (), no_skip: Iterable[str] = ()
) -> Iterator[None]:
    """Take parts out while the block runs.

    bypass: paths of Residuals (e.g. 'encoder.layers.1.attn_residual': that attention sublayer
        is skipped, the skip connection carries its input through) or of whole layers
        ('decoder.layers.2': the layer is removed).
    no_skip: paths of Residuals whose skip connection is removed (the sublayer output alone).
    """
    changed: list[Residual] = []
    try:
        for path in bypass:
            found = residuals(model, path)
            if not found:
                raise KeyError(f"nothing to bypass at {path!r}")
            for r in found.values():
                r.bypass = True
                changed.append(r)
        for path in no_skip:
            r = residuals(model).get(path)
            if r is None:
                raise KeyError(f"no Residual at {path!r}")
            r.skip = False
            changed.append(r)
        yield
    finally:
        for r in changed:
            r.bypass, r.skip = False, True


def head_stats(weights: Tensor, query_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per head: mean entropy (nats) of the attention rows and mean max weight, (H,) each.

    weights: (B, H, T, S); query_mask: (B, T) True on real query positions (padding excluded).
    Entropy 0 = all weight on one key; log(S) = spread evenly.
    """
    w = weights.float()
    entropy = -(w * w.clamp_min(1e-12).log()).sum(-1)  # (B, H, T)
    top = w.amax(-1)  # (B, H, T)
    if query_mask is None:
        query_mask = torch.ones(w.shape[0], w.shape[2], dtype=torch.bool)
    keep = query_mask[:, None, :].expand_as(entropy).float()
    n = keep.sum((0, 2)).clamp_min(1.0)
    return (entropy * keep).sum((0, 2)) / n, (top * keep).sum((0, 2)) / n
