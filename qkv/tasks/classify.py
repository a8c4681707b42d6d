"""Sentence classification: an encoder-only model reads a sentence, pools its token embeddings
into one vector, and a linear layer on that vector scores the classes (SST-2 sentiment, or any
`text<TAB>label` data with any label set).

Validation: accuracy (the metric that picks best/) and cross-entropy per sentence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig, TrainConfig
from ..data import (
    DataError,
    Example,
    hide_tokens,
    local_dataset_file,
    pad_batch,
    read_lines,
    token_batches,
)
from ..models import device_of
from . import encoder_start, sentence_limit

Labelled = tuple[str, str]  # (text, label)

SST2_LABELS = {"0": "negative", "1": "positive"}
SST2_SPLITS = ("glue/train", "glue/dev", "sentence/train", "sentence/dev", "sentence/test")


def read_labelled(path: str | Path) -> list[Labelled]:
    """`text<TAB>label` lines (a `sentence<TAB>label` header is skipped); DataError naming the
    file and line on a missing column, an empty text or an empty label."""
    rows = []
    for i, line in enumerate(read_lines(path), 1):
        cols = line.split("\t")
        if i == 1 and [c.strip().lower() for c in cols[:2]] in (
            ["sentence", "label"],
            ["text", "label"],
        ):
            continue
        if len(cols) < 2:
            raise DataError(f"{path}:{i}: expected text<TAB>label")
        text, label = cols[0].strip(), cols[1].strip()
        if not text or not label:
            raise DataError(f"{path}:{i}: empty {'text' if not text else 'label'}")
        rows.append((text, label))
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


def sst2(split: str, data_dir: str | Path | None = None) -> list[Labelled]:
    """An SST-2 split (`../shared/data/sst2/README.md`): glue/* is `sentence<TAB>label` with a
    header, sentence/* is `label<TAB>sentence` without one; labels become negative/positive."""
    if split not in SST2_SPLITS:
        raise DataError(f"sst2 has no split {split!r} (choose from {', '.join(SST2_SPLITS)})")
    path = local_dataset_file(f"sst2/{split}.tsv.gz", data_dir)
    rows = []
    for i, line in enumerate(read_lines(path), 1):
        cols = line.split("\t")
        if split.startswith("glue/"):
            if i == 1:
                continue  # header
            text, label = cols[0], cols[-1]
        else:
            label, text = cols[0], cols[-1]
        if label.strip() not in SST2_LABELS:
            raise DataError(f"{path}:{i}: label {label.strip()!r} is not 0 or 1")
        rows.append((text.strip(), SST2_LABELS[label.strip()]))
    return rows


def labels_of(rows: list[Labelled]) -> list[str]:
    """The label set, in a stable order: numeric labels by value, others alphabetically."""
    labels = {label for _, label in rows}
    try:
        return sorted(labels, key=float)
    except ValueError:
        return sorted(labels)


def check_labels(rows: list[Labelled], labels: list[str], name: str) -> None:
    """DataError naming the first label the model does not know."""
    known = set(labels)
    for i, (_, label) in enumerate(rows, 1):
        if label not in known:
            raise DataError(
                f"{name}: example {i} has label {label!r}, unseen in training "
                f"(known: {', '.join(labels)})"
            )


@dataclass
class LabelledBatch:
    ids: Tensor  # (B, S) token ids ending in eos, padded
    labels: Tensor  # (B,) class indices
    tokens: int  # sentences: the loss is a mean over sentences

    def to(self, device: torch.device | str) -> LabelledBatch:
        return LabelledBatch(self.ids.to(device), self.labels.to(device), self.tokens)


class Classification:
    """The sentence-classification task for the training loop."""

    name = "classify"
    metric = "valid_accuracy"
    maximize = True
    unit = "sentences"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.tokenizer = None

    def _rows(self) -> tuple[list[Labelled], list[Labelled], str]:
        cfg = self.cfg
        if cfg.tsv_file:
            train = read_labelled(cfg.tsv_file)
            if cfg.valid_tsv_file:
                return train, read_labelled(cfg.valid_tsv_file), cfg.valid_tsv_file
            n = min(1000, max(1, len(train) // 10))  # a deterministic held-out slice
            return train[:-n], train[-n:], f"{cfg.tsv_file} (last {n})"
        valid = read_labelled(cfg.valid_tsv_file) if cfg.valid_tsv_file else None
        return (
            sst2("glue/train", cfg.data_dir),
            valid or sst2("glue/dev", cfg.data_dir),
            cfg.valid_tsv_file or "sst2 glue/dev",
        )

    def prepare(self, base: ModelConfig, out: Path, resume: bool, log) -> ModelConfig:
        train, valid, valid_name = self._rows()
        self.labels = labels_of(train)
        if len(self.labels) < 2:
            raise DataError(f"the training data has one label only ({self.labels[0]!r})")
        check_labels(valid, self.labels, valid_name)
        tok, base = encoder_start(self.cfg, base, [t for t, _ in train], out, resume)
        self.tokenizer = tok
        index = {label: i for i, label in enumerate(self.labels)}
        limit = sentence_limit(self.cfg, base)
        self.train_set = self._examples(tok, train, index, limit)
        self.valid_set = self._examples(tok, valid, index, limit)
        log(
            f"data: {len(self.train_set):,} training sentences, {len(self.valid_set):,} "
            f"validation; labels {', '.join(self.labels)}; vocabulary {tok.vocab_size:,}"
        )
        self.model_cfg = base.replace(
            arch="encoder-only",
            tgt_vocab_size=None,
            n_decoder_layers=0,
            n_classes=len(self.labels),
            max_len=max(base.max_len, limit + 1),
        )
        return self.model_cfg

    def init_model(self, model: nn.Module) -> None:
        pass

    @staticmethod
    def _examples(tok, rows: list[Labelled], index: dict[str, int], limit: int) -> list[Example]:
        """Sentences cut to `limit` tokens (a review's start says most of its sentiment); the
        label rides in `tgt`."""
        ids = tok.encode_batch([t for t, _ in rows])
        return [Example(x[:limit], [index[y]]) for x, (_, y) in zip(ids, rows, strict=True)]

    def batches(self, epoch: int) -> list[list[int]]:
        return token_batches(self.train_set, self.cfg.max_tokens, self.cfg.seed, epoch)

    def _collate(self, examples: list[Example], token_dropout: float = 0.0) -> LabelledBatch:
        mc = self.model_cfg
        ids = pad_batch([e.src for e in examples], mc.pad_id, mc.eos_id)
        ids = hide_tokens(ids, token_dropout, self.tokenizer.unk_id, mc.pad_id, mc.eos_id)
        labels = torch.tensor([e.tgt[0] for e in examples])
        return LabelledBatch(ids, labels, len(examples))

    def collate(self, indices: list[int]) -> LabelledBatch:
        """A training batch, with word dropout."""
        return self._collate([self.train_set[i] for i in indices], self.cfg.token_dropout)

    def loss(self, model: nn.Module, batch: LabelledBatch) -> Tensor:
        logits = model(batch.ids).float()
        return F.cross_entropy(
            logits, batch.labels, reduction="sum", label_smoothing=self.cfg.label_smoothing
        )

    def validate(self, model: nn.Module) -> dict[str, float]:
        return self.validate_merge([self.validate_part(model, 0, 1)])

    def validate_part(self, model: nn.Module, rank: int, size: int) -> tuple[float, int, int]:
        """Process `rank` of `size`'s share, every size-th batch: (loss, right, sentences)."""
        device = device_of(model)
        total, right, n = 0.0, 0, 0
        batches = token_batches(self.valid_set, self.cfg.max_tokens, 0, 0, shuffle=False)
        for idx in batches[rank::size]:
            batch = self._collate([self.valid_set[i] for i in idx]).to(device)
            logits = model(batch.ids).float()
            total += F.cross_entropy(logits, batch.labels, reduction="sum").item()
            right += int((logits.argmax(-1) == batch.labels).sum())
            n += batch.tokens
        return total, right, n

    def validate_merge(self, parts: list[tuple[float, int, int]]) -> dict[str, float]:
        total, right, n = (sum(p[i] for p in parts) for i in range(3))
        return {"valid_accuracy": 100 * right / max(n, 1), "valid_loss": total / max(n, 1)}

    def meta(self) -> dict[str, Any]:
        return {"labels": self.labels}
