"""Next-item prediction: a decoder-only model over item ids reads each user's history in time
order and predicts the next item at every position, as a language model predicts the next word
(data and split: qkv.items; rankings and metrics: qkv.recommend).

Losses: full softmax cross-entropy over all items (default; "SASRec+", Klenitskiy & Vasilev
2023), or SASRec's binary cross-entropy with sampled negatives (Kang & McAuley 2018).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import checkpoint
from ..config import ModelConfig, TrainConfig
from ..data import Example, token_batches
from ..items import (
    leave_one_out,
    ml1m_file,
    read_interactions,
    right_pad,
    seen_mask,
    unseen_negatives,
    windows,
)
from ..loss import linear_cross_entropy
from ..recommend import BatchRanks, rank_targets, report
from ..tokenizer import PAD, Items
from . import decoder_only


@dataclass
class ItemBatch:
    x: Tensor  # (B, T) input items, right-padded
    y: Tensor  # (B, T) the next items, PAD where there is none
    tokens: int  # targets in the batch
    negatives: Tensor | None = None  # (B, T, K) sampled items the user has not seen (bce)

    def to(self, device: torch.device | str) -> ItemBatch:
        neg = self.negatives.to(device) if self.negatives is not None else None
        return ItemBatch(self.x.to(device), self.y.to(device), self.tokens, neg)


class NextItem:
    """The next-item task for the training loop."""

    name = "items"
    metric = "valid_ndcg10"
    maximize = True
    unit = "items"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.tokenizer: Items | None = None

    def source(self) -> Path:
        cfg = self.cfg
        return Path(cfg.interactions_file) if cfg.interactions_file else ml1m_file(cfg.data_dir)

    def prepare(self, base: ModelConfig, out: Path, resume: bool, log) -> ModelConfig:
        cfg, path = self.cfg, self.source()
        users = read_interactions(path)
        path_items = out / Items.FILE
        if resume and path_items.is_file():
            items = Items.load(path_items)
        else:
            # every item of the file, so that rankings are over the whole catalogue (an item
            # seen only as someone's test target keeps its initial embedding)
            items = Items([i for seq in users.values() for i in seq])
        self.data = leave_one_out(users, items, str(path))  # the last input check
        if not (resume and path_items.is_file()):
            out.mkdir(parents=True, exist_ok=True)
            checkpoint.write_text_atomic(path_items, items.to_str())
        self.tokenizer = items
        self.train_seqs = self.data.train()
        self.windows = windows(self.train_seqs, cfg.block_size)
        self.examples = [Example(w, []) for _, w in self.windows]
        n = sum(len(s) for s in self.data.sequences)
        log(
            f"data: {len(self.data.users):,} users, {items.n_items:,} items, {n:,} interactions; "
            f"{len(self.windows):,} training windows of up to {cfg.block_size} items; "
            f"loss {cfg.item_loss}"
        )
        self.model_cfg = decoder_only(base, items, cfg.block_size)
        return self.model_cfg

    def init_model(self, model: nn.Module) -> None:
        pass

    def batches(self, epoch: int) -> list[list[int]]:
        return token_batches(self.examples, self.cfg.max_tokens, self.cfg.seed, epoch)

    def collate(self, indices: list[int]) -> ItemBatch:
        w = [self.windows[i][1] for i in indices]
        x, y = right_pad([s[:-1] for s in w]), right_pad([s[1:] for s in w])
        tokens = int((y != PAD).sum())
        if self.cfg.item_loss == "ce":
            return ItemBatch(x, y, tokens)
        # negatives: never an item of the user's training sequence, as SASRec (its validation
        # and test items are not known to training); drawn from torch's global generator,
        # which a resumed run restores
        seen = seen_mask(
            [self.train_seqs[self.windows[i][0]] for i in indices], self.model_cfg.vocab_size
        )
        shape = (y.shape[1], self.cfg.negatives)
        neg = unseen_negatives(seen, shape, Items.first)
        return ItemBatch(x, y, tokens, neg)

    def loss(self, model: nn.Module, batch: ItemBatch) -> Tensor:
        return item_loss(model, batch, self.cfg.label_smoothing)

    def validate(self, model: nn.Module) -> dict[str, float]:
        return self.validate_merge([self.validate_part(model, 0, 1)])

    def validate_part(self, model: nn.Module, rank: int, size: int) -> BatchRanks:
        """Process `rank` of `size`'s share of the users' validation ranks."""
        vocab, block = self.model_cfg.vocab_size, self.cfg.block_size
        seed = self.cfg.seed
        return rank_targets(model, self.data, "valid", block, vocab, seed, rank=rank, size=size)

    def validate_merge(self, parts: list[BatchRanks]) -> dict[str, float]:
        users = len(self.data.history("valid"))
        return report("valid", users, self.model_cfg.vocab_size, parts).scores("valid")

    def meta(self) -> dict[str, Any]:
        return {
            "interactions": str(self.source()),
            "block_size": self.cfg.block_size,
            "item_loss": self.cfg.item_loss,
        }


def item_loss(model: nn.Module, batch: ItemBatch, label_smoothing: float = 0.0) -> Tensor:
    """Summed loss over a batch's targets. Hidden states are projected onto item embeddings at
    real positions only (padding costs no output layer)."""
    h = model.decoder(batch.x)  # (B, T, D)
    real = batch.y != PAD
    if batch.negatives is None:  # full softmax over the items (specials are never targets)
        # scores against the item rows only (a contiguous matrix, not a slice of a larger one)
        weight, bias = model.lm_head.weight[Items.first :], model.lm_head.bias
        bias = None if bias is None else bias[Items.first :]
        target = batch.y[real] - Items.first
        return linear_cross_entropy(h[real], weight, bias, target, label_smoothing)
    weight = model.lm_head.weight  # the item embeddings (tied)
    h = h[real]  # (N, D)
    pos = (h * weight[batch.y[real]]).sum(-1)  # (N,)
    neg = torch.einsum("nd,nkd->nk", h, weight[batch.negatives[real]])  # (N, K)
    # -log sigmoid(pos) - sum log(1 - sigmoid(neg))
    return (F.softplus(-pos.float()) + F.softplus(neg.float()).sum(-1)).sum()
