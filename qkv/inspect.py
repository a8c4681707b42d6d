"""Look inside a model while it runs: record every head's attention weights and every layer's
hidden states, silence heads, take sublayers, layers and skip connections out.

These are observers that opt in for the duration of a `with` block; forward signatures do not
change and training, which never enters these blocks, always runs the fused kernel. Blocks nest:
leaving one restores what the enclosing block had set.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from .attention import MultiHeadAttention
from .layers import Residual
from .recurrent import AdditiveAttention

Recordable = (MultiHeadAttention, AdditiveAttention)


class AttentionKind(str, Enum):
    """The three places attention sits in a Transformer."""

    ENCODER_SELF = "encoder self"
    DECODER_SELF = "decoder self"
    CROSS = "cross"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


def attention_kind(path: str) -> AttentionKind:
    """Which kind of attention the module at `path` (e.g. 'decoder.layers.0.cross_attn') is."""
    if path.startswith("encoder"):
        return AttentionKind.ENCODER_SELF
    if path.endswith("cross_attn"):
        return AttentionKind.CROSS
    return AttentionKind.DECODER_SELF


def module_order(path: str) -> list[Any]:
    """A sort key for module paths that orders layers by number (layer 10 after layer 9)."""
    return [int(x) if x.isdigit() else x for x in path.split(".")]


def layer_index(path: str) -> int:
    """The layer number in a module path ('decoder.layers.2.self_attn' -> 2)."""
    parts = path.split(".")
    return int(parts[parts.index("layers") + 1])


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
def record_attention(model: nn.Module) -> Iterator[AttentionRecording]:
    """Capture the attention weights of every layer and head while the block runs.

    with record_attention(model) as rec:
        model(src, tgt)
    rec["encoder.layers.0.self_attn"][0]  # (B, H, S, S), rows sum to 1
    """
    rec = AttentionRecording()
    # the recurrent baseline's additive attention records the same way (one head)
    modules = {n: m for n, m in model.named_modules() if isinstance(m, Recordable)}
    names = {id(m): n for n, m in modules.items()}

    def recorder(module: nn.Module, weights: Tensor) -> None:
        rec.setdefault(names[id(module)], []).append(weights.detach())

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
def record_hidden(modules: Sequence[nn.Module]) -> Iterator[list[list[Tensor]]]:
    """Capture the output of each module (e.g. [encoder.embed, *encoder.layers]) on every call:
    rec[i] lists module i's outputs (B, T, D) in call order. Forward hooks; nothing else changes.

    with record_hidden(model.encoder.layers) as rec:
        model.encode(src)
    rec[0][0]  # the first layer's output
    """
    rec: list[list[Tensor]] = [[] for _ in modules]
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, i=i: rec[i].append(out.detach()))
        for i, m in enumerate(modules)
    ]
    try:
        yield rec
    finally:
        for h in hooks:
            h.remove()


@contextmanager
def mask_heads(model: nn.Module, heads: dict[str, Iterable[int]]) -> Iterator[None]:
    """Silence heads while the block runs: {attention module path: [head indices]}. A silenced
    head's output is zero before the output projection, so it contributes nothing. Inside an
    enclosing block, heads it silenced stay silent."""
    modules = attention_modules(model)
    for path in heads:
        if path not in modules:
            raise KeyError(f"no attention module {path!r}")
    before = {path: modules[path].head_mask for path in heads}
    try:
        for path, idx in heads.items():
            m = modules[path]
            device = m.out_proj.weight.device
            mask = torch.ones(m.n_heads, device=device) if before[path] is None else before[path]
            mask = mask.clone()
            mask[list(idx)] = 0.0
            m.head_mask = mask
        yield
    finally:
        for path, mask in before.items():
            modules[path].head_mask = mask


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
    before: dict[int, tuple[Residual, bool, bool]] = {}
    try:
        for path in bypass:
            found = residuals(model, path)
            if not found:
                raise KeyError(f"nothing to bypass at {path!r}")
            for r in found.values():
                before.setdefault(id(r), (r, r.bypass, r.skip))
                r.bypass = True
        for path in no_skip:
            r = residuals(model).get(path)
            if r is None:
                raise KeyError(f"no Residual at {path!r}")
            before.setdefault(id(r), (r, r.bypass, r.skip))
            r.skip = False
        yield
    finally:
        for r, was_bypassed, had_skip in before.values():
            r.bypass, r.skip = was_bypassed, had_skip


def head_stats(weights: Tensor, query_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per head: mean entropy (nats) of the attention rows and mean max weight, (H,) each.

    weights: (B, H, T, S); query_mask: (B, T) True on real query positions (padding excluded).
    Entropy 0 = all weight on one key; log(S) = spread evenly.
    """
    w = weights.float()
    entropy = -(w * w.clamp_min(1e-12).log()).sum(-1)  # (B, H, T)
    top = w.amax(-1)  # (B, H, T)
    if query_mask is None:
        query_mask = torch.ones(w.shape[0], w.shape[2], dtype=torch.bool, device=w.device)
    keep = query_mask[:, None, :].expand_as(entropy).float()
    n = keep.sum((0, 2)).clamp_min(1.0)
    return (entropy * keep).sum((0, 2)) / n, (top * keep).sum((0, 2)) / n
