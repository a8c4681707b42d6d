"""Language modelling: a decoder-only model learns to predict each next token of one long text
(characters or byte-level BPE), from random windows of `block_size` tokens.

Validation scores the held-out text in consecutive windows: cross-entropy per token in nats
(the metric that picks best/), per character, and perplexity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import checkpoint
from ..config import ModelConfig, TrainConfig
from ..data import DataError, read_text, tinyshakespeare_file
from ..loss import linear_cross_entropy
from ..models import device_of
from ..tokenizer import Characters, Subwords, Tokenizer
from . import decoder_only


@dataclass
class Texts:
    train: str
    valid: str
    train_name: str  # for error messages
    valid_name: str
    whole: str  # what a character vocabulary is built from


def load_texts(cfg: TrainConfig) -> Texts:
    """Training and validation text as the config names them. Without a validation file the last
    10% of the text is held out (nanoGPT's split); DataError on bad input."""
    path = Path(cfg.text_file) if cfg.text_file else tinyshakespeare_file(cfg.data_dir)
    text = read_text(path)
    if cfg.valid_text_file:
        return Texts(text, read_text(cfg.valid_text_file), str(path), cfg.valid_text_file, text)
    n = int(len(text) * 0.9)
    return Texts(text[:n], text[n:], str(path), f"{path} (last 10%)", text)


@dataclass
class Windows:
    """Training windows: inputs (B, T) and the next tokens (B, T)."""

    x: Tensor
    y: Tensor

    @property
    def tokens(self) -> int:
        return self.y.numel()

    def to(self, device: torch.device | str) -> Windows:
        return Windows(self.x.to(device), self.y.to(device))


def lm_loss(model: nn.Module, x: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Summed cross-entropy of a decoder-only model's next-token predictions over windows (the
    output layer fused with the loss: qkv.loss.linear_cross_entropy)."""
    h = model.decoder(x).flatten(0, 1)  # (B * T, D): model(x) without its output layer
    head = model.lm_head
    return linear_cross_entropy(h, head.weight, head.bias, y.flatten(), label_smoothing)


def spread(items: list[int], k: int) -> list[int]:
    """k items evenly spaced over the list (all of them when k is 0 or too large)."""
    if k <= 0 or k >= len(items):
        return items
    return [items[i * len(items) // k] for i in range(k)]


class LanguageModel:
    """The language-model task for the training loop."""

    name = "lm"
    metric = "valid_loss"
    maximize = False

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.tokenizer: Tokenizer | None = None

    def _tokenizer(self, texts: Texts, out: Path, resume: bool) -> Characters | Subwords:
        cfg = self.cfg
        kind = Characters if cfg.tokenizer == "char" else Subwords
        path = out / kind.FILE
        if resume and path.is_file():
            return kind.load(path)
        if cfg.tokenizer == "char":
            tok: Characters | Subwords = Characters.of(texts.whole)
        else:
            tok = Subwords.train_bytes(texts.train.splitlines(keepends=True), cfg.vocab_size)
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.write_text_atomic(path, tok.to_str())
        return tok

    def prepare(self, base: ModelConfig, out: Path, resume: bool, log) -> ModelConfig:
        cfg, texts = self.cfg, load_texts(self.cfg)
        if cfg.tokenizer == "char" and cfg.valid_text_file:
            outside = Characters.of(texts.train).unknown(texts.valid)
            if outside:
                raise DataError(
                    f"{texts.valid_name}: {len(outside)} character(s) not in the training text's "
                    f"vocabulary: {''.join(outside[:20])!r}"
                )
        tok = self._tokenizer(texts, out, resume)
        self.tokenizer = tok
        self.train_ids = self._encode(tok, texts.train, texts.train_name)
        self.valid_ids = self._encode(tok, texts.valid, texts.valid_name)
        # nats per character = nats per token * tokens per character (1 for characters)
        self.tokens_per_char = len(self.valid_ids) / len(texts.valid)
        log(
            f"data: {len(self.train_ids):,} training tokens, {len(self.valid_ids):,} validation; "
            f"{cfg.tokenizer} vocabulary {tok.vocab_size:,}; windows of {cfg.block_size}"
        )
        self.model_cfg = decoder_only(base, tok, cfg.block_size)
        return self.model_cfg

    def _encode(self, tok: Characters | Subwords, text: str, name: str) -> Tensor:
        ids = torch.tensor(tok.encode(text), dtype=torch.long)
        if len(ids) <= self.cfg.block_size:
            raise DataError(
                f"{name}: {len(ids):,} tokens, shorter than one window of block_size "
                f"{self.cfg.block_size} + 1"
            )
        return ids

    def init_model(self, model: nn.Module) -> None:
        pass

    @property
    def windows_per_batch(self) -> int:
        return max(1, self.cfg.max_tokens // self.cfg.block_size)

    def batches(self, epoch: int) -> list[list[int]]:
        """Random window starts; an epoch has as many windows as fit in the text end to end."""
        b, t = self.windows_per_batch, self.cfg.block_size
        n = len(self.train_ids) // (b * t)
        g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        starts = torch.randint(0, len(self.train_ids) - t, (max(n, 1), b), generator=g)
        return starts.tolist()

    def _windows(self, ids: Tensor, starts: list[int]) -> Windows:
        t = self.cfg.block_size
        w = torch.stack([ids[s : s + t + 1] for s in starts])  # (B, T+1)
        return Windows(w[:, :-1], w[:, 1:])

    def collate(self, indices: list[int]) -> Windows:
        return self._windows(self.train_ids, indices)

    def loss(self, model: nn.Module, batch: Windows) -> Tensor:
        return lm_loss(model, batch.x, batch.y, self.cfg.label_smoothing)

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Cross-entropy of the validation text, scored in consecutive windows of block_size
        (the first token of each window has no context, as in training). With eval_tokens, a
        subset of the windows spread evenly over the whole text (its beginning alone can be
        easier or harder than the rest)."""
        return self.validate_merge([self.validate_part(model, 0, 1)])

    def validate_part(self, model: nn.Module, rank: int, size: int) -> tuple[float, int]:
        """Process `rank` of `size`'s share: every size-th batch of windows, (loss, tokens)."""
        device, t = device_of(model), self.cfg.block_size
        starts = spread(list(range(0, len(self.valid_ids) - t, t)), self.cfg.eval_tokens // t)
        total, n = 0.0, 0
        for i in list(range(0, len(starts), self.windows_per_batch))[rank::size]:
            w = self._windows(self.valid_ids, starts[i : i + self.windows_per_batch]).to(device)
            total, n = total + lm_loss(model, w.x, w.y).item(), n + w.tokens
        return total, n

    def validate_merge(self, parts: list[tuple[float, int]]) -> dict[str, float]:
        loss = sum(p[0] for p in parts) / max(sum(p[1] for p in parts), 1)
        return {
            "valid_loss": loss,
            "valid_nats_per_char": loss * self.tokens_per_char,
            "valid_ppl": math.exp(min(loss, 50.0)),
        }

    def meta(self) -> dict[str, Any]:
        return {"tokenizer": self.cfg.tokenizer, "block_size": self.cfg.block_size}
