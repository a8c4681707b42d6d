"""Look inside a model while it runs: record every head's attention weights, silence heads.

These are observers that opt in for the duration of a `with` block; forward signatures do not
change and training, which never enters these blocks, always runs the fused kernel.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from .attention import MultiHeadAttention


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
