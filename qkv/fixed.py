"""Fixed-shape decoding: every step of a batch has the same tensor shapes, so the decoding step
can be compiled once (torch.compile, inductor) and replayed; the approach of PyTorch's gpt-fast.

The eager path (cache.py: caches that grow, rows that leave as sentences finish) stays the
reference and the default. This one differs only in bookkeeping:
- the self-attention keys/values are preallocated to the batch's longest output and written at
  a position passed as a tensor; a mask hides the positions not written yet;
- the rows are fixed: a finished sentence's rows keep computing (nothing reads them), and a
  beam reorder gathers whole buffers with one fixed-size index;
- each sentence keeps its slot, so cross-attention keys/values (one row per sentence, shared by
  its beams as in cache.py) never move.
The layers themselves run unchanged (DecoderLayer.forward with caches that quack like KVCache),
so the attention is the same `attention()` as everywhere else.
tests/test_fixed.py checks the outputs against the eager path, compiled and not.

Shapes: B sentences, G rows per sentence (beams), N = B * G rows, L positions, S source length.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from .models import EncoderDecoder

StepFn = Callable[..., Tensor]


class _WrittenAt:
    """Self-attention keys/values (N, H, L, Dh), written at position `pos` (a 1-element tensor)."""

    static = False

    def __init__(self, k: Tensor, v: Tensor, pos: Tensor):
        self.k_buf, self.v_buf, self.pos = k, v, pos

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, None]:
        self.k_buf.index_copy_(2, self.pos, k)
        self.v_buf.index_copy_(2, self.pos, v)
        return self.k_buf, self.v_buf, None  # one row per row (KVCache.append's table: None)


class _Shared:
    """Cross-attention keys/values (B, H, S, Dh), each row read by `group` decoder rows."""

    static = True

    def __init__(self, k: Tensor, v: Tensor, group: int):
        self.k, self.v, self.group, self.length = k, v, group, k.shape[2]


def fixed_step(
    model: EncoderDecoder,
    tokens: Tensor,
    pos: Tensor,
    self_k: list[Tensor],
    self_v: list[Tensor],
    cross_k: list[Tensor],
    cross_v: list[Tensor],
    memory_mask: Tensor,
) -> Tensor:
    """One decoding step at position `pos` (1,): tokens (N, 1) -> log-probabilities (N, V).
    Writes the new keys/values into self_k/self_v (N, H, L, Dh) in place."""
    dec = model.decoder
    group = tokens.shape[0] // memory_mask.shape[0]
    x = dec.embed.at(tokens, pos)  # (N, 1, D)
    length = self_k[0].shape[2]
    seen = (torch.arange(length, device=tokens.device) <= pos).view(1, 1, 1, length)
    for i, layer in enumerate(dec.layers):
        x = layer(
            x,
            None,
            memory_mask,
            seen,
            self_cache=_WrittenAt(self_k[i], self_v[i], pos),  # type: ignore[arg-type]
            cross_cache=_Shared(cross_k[i], cross_v[i], group),  # type: ignore[arg-type]
        )
    return model.lm_head(dec.norm(x))[:, -1].float().log_softmax(-1)


class FixedCache:
    """The search state of fixed-shape decoding (search's State: `select(index)`).

    Search sees n live rows, in its own order; `phys` (n,) says where each lives among the N
    fixed rows. Sentences never move: the j-th live row of sentence s sits at row s * G + j.
    Beam search (G = K rows per sentence) starts with one row per sentence, at s * G: the first
    step computes the other rows too (the shapes are fixed) and the first select copies the
    first row over them.
    """

    def __init__(self, model: EncoderDecoder, src: Tensor, steps: int, group: int = 1):
        memory, mask = model.encode(src)
        self.memory_mask = mask  # (B, 1, 1, S)
        cross = [layer.cross_attn.project_kv(memory) for layer in model.decoder.layers]
        self.cross_k, self.cross_v = [k for k, _ in cross], [v for _, v in cross]
        self.b, self.steps, self.group = src.shape[0], steps, group
        self.heads = model.config.n_heads
        self.d_head = model.config.d_model // self.heads
        self.self_k: list[Tensor] = []
        self.self_v: list[Tensor] = []
        self.phys = torch.arange(self.b, device=src.device) * group  # (n,)
        self.pos = 0

    @property
    def rows(self) -> int:
        return self.b * self.group

    def _allocate(self, like: Tensor) -> None:
        shape = (self.rows, self.heads, self.steps, self.d_head)
        self.self_k = [like.new_zeros(shape) for _ in self.cross_k]
        self.self_v = [like.new_zeros(shape) for _ in self.cross_k]

    def select(self, index: Tensor) -> None:
        device, g = index.device, self.group
        if len(index) % g:
            raise ValueError(f"fixed-shape decoding keeps groups of {g} rows")
        if len(index) > self.rows:  # beam search on a state started without its group
            raise ValueError(
                f"fixed-shape decoding was started for {self.rows} rows ({self.b} x group "
                f"{g}), not {len(index)}: pass the beam size as the group"
            )
        # each group search keeps stays in its sentence's slot (its rows' physical group)
        slots = self.phys[index[::g]] // g
        new_phys = (slots[:, None] * g + torch.arange(g, device=device)).view(-1)
        src = self.phys[index]
        if not torch.equal(src, new_phys):
            perm = torch.arange(self.rows, device=device)
            perm[new_phys] = src
            self.self_k = [k.index_select(0, perm) for k in self.self_k]
            self.self_v = [v.index_select(0, perm) for v in self.self_v]
        self.phys = new_phys


class FixedDecoder:
    """Builds the search's (step, state) pair for fixed-shape decoding, compiled or not.

    `compile=True` compiles `fixed_step` with inductor; torch.compile caches one graph per shape
    (rows, source length, steps), so translate pads batches to fixed buckets (`bucket`). By
    default the weights are inputs of the graph: an in-place change (training) is read afresh,
    and inductor's on-disk cache serves the graphs to the next process (bench/README.md:
    a second process compiles in about 4 s instead of 9-11). `freeze=True` bakes them into the
    graph as constants (inductor packs them: a few percent faster per step in
    bench/compile_freeze.sh) but inductor then bypasses its graph cache, and a change of
    weights must throw the graphs away: `weights_key` is checked before every batch.
    """

    def __init__(self, model: EncoderDecoder, compile: bool = False, freeze: bool = False):
        self.model, self.compile, self.freeze = model, compile, freeze
        self._fn: StepFn | None = None
        self._key: str | None = None
        self.compiles = 0  # times compiled from scratch (tests read it)

    def _step_fn(self) -> StepFn:
        if not self.compile:
            return fixed_step
        key = weights_key(self.model) if self.freeze else None
        if self._fn is None or key != self._key:
            import torch._dynamo
            import torch._inductor.config as inductor_config

            torch._dynamo.reset()  # frozen weights of an older key must not be reused
            inductor_config.freezing = self.freeze
            self._fn = torch.compile(fixed_step, dynamic=False)
            self._key = key
            self.compiles += 1
        return self._fn

    def start(
        self, src: Tensor, steps: int, group: int = 1
    ) -> tuple[Callable[[Tensor, FixedCache], Tensor], FixedCache]:
        """(step, state) for search over sources `src` (B, S), at most `steps` tokens each,
        `group` rows per sentence (beam search: K)."""
        fn, model = self._step_fn(), self.model
        state = FixedCache(model, src, steps, group)

        def step(tokens: Tensor, cache: FixedCache) -> Tensor:
            if tokens.shape[1] != 1:
                raise ValueError("fixed-shape decoding feeds one token per step (no prefix)")
            if cache.pos >= cache.steps:
                raise ValueError(f"fixed-shape decoding was sized for {cache.steps} steps")
            if not cache.self_k:
                cache._allocate(cache.cross_k[0])
            full = tokens.new_full((cache.rows, 1), model.config.pad_id)
            full[cache.phys] = tokens
            pos = torch.tensor([cache.pos], device=tokens.device)
            c = cache
            out = fn(model, full, pos, c.self_k, c.self_v, c.cross_k, c.cross_v, c.memory_mask)
            cache.pos += 1
            return out[cache.phys]

        return step, state


def weights_key(model: torch.nn.Module) -> str:
    """A fingerprint of the weights' values (not their identity: optimizers update in place)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            t = p.detach().float()
            h.update(name.encode())
            h.update(torch.stack([t.sum(), t.abs().sum(), (t * t).sum()]).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def use_disk_cache(root: Path | None = None) -> Path:
    """Keep inductor's caches (compiled kernels, and the graphs when the weights are not frozen)
    under the qkv cache dir, so a second run of `qkv translate --compile` only traces."""
    path = root or Path(os.environ.get("QKV_CACHE", Path.home() / ".cache" / "qkv")) / "inductor"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(path))
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def bucket(n: int, step: int) -> int:
    """n rounded up to a multiple of `step`: few distinct shapes, so few compiled graphs."""
    return -(-n // step) * step
