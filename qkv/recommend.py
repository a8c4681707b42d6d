"""Ranking next items, and scoring the rankings the way the field's papers do and the way its
critics say they should.

A model scores every item as the next one after a history (the last block_size items are read).
Items the user has already seen are excluded from the ranking, and a target's rank counts every
other candidate that scores at least as high: ties go against the target, so a model that
scores everything alike ranks last, not first.

Two protocols, both over all users (leave-one-out, qkv.tasks.items):
- full: the target against every item of the catalogue (Krichene & Rendle 2020 show that
  sampled metrics can reorder models; this is the one to trust);
- sampled: the target against 100 items drawn uniformly, without replacement, from those the
  user has not seen (SASRec's protocol, Kang & McAuley 2018), with a fixed seed.
HR@k: the share of users whose target ranks in the top k. NDCG@k: 1 / log2(rank + 2) for those,
0 for the rest (rank from 0), averaged over users. Beside them, the most-popular baseline: items
ranked by how often they occur in every user's history.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .items import Histories, right_pad, seen_mask
from .models import device_of
from .tokenizer import Items

K = 10
SAMPLED = 100


@torch.no_grad()
def next_item_scores(
    model: nn.Module, histories: Sequence[Sequence[int]], block_size: int
) -> Tensor:
    """(B, vocab) scores of every item as the next one after each history (vocabulary indices,
    at least one item each); specials score -inf. Histories are right-padded: causal attention
    keeps the padding after the last item from touching it."""
    device = device_of(model)
    last = [list(h[-block_size:]) for h in histories]
    x = right_pad(last).to(device)
    ends = torch.tensor([len(h) - 1 for h in last], device=device)
    h = model.decoder(x)[torch.arange(len(last), device=device), ends]  # (B, D)
    scores = model.lm_head(h).float()
    scores[:, : Items.first] = -math.inf
    return scores


def target_ranks(scores: Tensor, targets: Tensor, excluded: Tensor) -> Tensor:
    """Each target's rank from 0 among the items not `excluded` (B, V): the number of other
    candidates that score at least as high (pessimistic ties)."""
    t = scores.gather(1, targets[:, None])
    above = (scores >= t) & ~excluded
    above.scatter_(1, targets[:, None], False)
    return above.sum(1)


def sample_negatives(
    excluded: Tensor, targets: Tensor, n: int, generator: torch.Generator
) -> Tensor:
    """(B, n) items per row drawn uniformly without replacement from those neither excluded
    nor the row's target (n shrinks to the fewest candidates any row has)."""
    allowed = (~excluded).float().cpu()
    allowed.scatter_(1, targets.cpu()[:, None], 0.0)
    n = min(n, int(allowed.sum(1).min()))
    if n == 0:
        return targets.new_zeros((len(targets), 0))
    return torch.multinomial(allowed, n, generator=generator).to(targets.device)


def sampled_ranks(
    scores: Tensor, targets: Tensor, excluded: Tensor, n: int, generator: torch.Generator
) -> Tensor:
    """Each target's rank from 0 among n sampled candidates (`sample_negatives`)."""
    return ranks_among(scores, targets, sample_negatives(excluded, targets, n, generator))


def ranks_among(scores: Tensor, targets: Tensor, negatives: Tensor) -> Tensor:
    """Each target's rank from 0 among the given negatives (ties count against it)."""
    t = scores.gather(1, targets[:, None])
    return (scores.gather(1, negatives) >= t).sum(1)


def hit_rate(ranks: Tensor, k: int = K) -> float:
    return float((ranks < k).float().mean())


def ndcg(ranks: Tensor, k: int = K) -> float:
    gain = 1.0 / torch.log2(ranks.double() + 2.0)
    return float(torch.where(ranks < k, gain, 0.0).mean())


@dataclass
class Ranks:
    """One system's target ranks under both protocols, a row of the report."""

    full: list[Tensor] = field(default_factory=list)
    sampled: list[Tensor] = field(default_factory=list)

    def metrics(self, k: int = K) -> dict[str, float]:
        full, sampled = torch.cat(self.full), torch.cat(self.sampled)
        return {
            f"hr{k}": hit_rate(full, k),
            f"ndcg{k}": ndcg(full, k),
            f"sampled_hr{k}": hit_rate(sampled, k),
            f"sampled_ndcg{k}": ndcg(sampled, k),
        }


@dataclass
class Report:
    split: str
    users: int
    items: int
    systems: dict[str, dict[str, float]]  # "qkv", "most popular" -> metrics

    def scores(self, prefix: str, system: str = "qkv") -> dict[str, float]:
        return {f"{prefix}_{k}": v for k, v in self.systems[system].items()}

    def table(self) -> str:
        head = (
            f"{self.split}: {self.users:,} users, {self.items:,} items; "
            f"full ranking over all items | {SAMPLED} sampled negatives"
        )
        rows = [head, f"{'':14} {'HR@10':>7} {'NDCG@10':>8} | {'HR@10':>7} {'NDCG@10':>8}"]
        for name, m in self.systems.items():
            rows.append(
                f"{name:14} {m['hr10']:7.4f} {m['ndcg10']:8.4f} | "
                f"{m['sampled_hr10']:7.4f} {m['sampled_ndcg10']:8.4f}"
            )
        return "\n".join(rows)


def popularity(histories: Sequence[Sequence[int]], vocab: int) -> Tensor:
    """How often each item occurs in all the histories (specials: -inf), as scores."""
    counts = torch.zeros(vocab, dtype=torch.float)
    for h in histories:
        counts.index_add_(0, torch.tensor(h, dtype=torch.long), torch.ones(len(h)))
    counts[: Items.first] = -math.inf
    return counts


@torch.no_grad()
def evaluate(
    model: nn.Module | None,
    data: Histories,
    split: str,
    block_size: int,
    *,
    vocab: int | None = None,
    seed: int = 0,
    popular: bool = False,
    batch_users: int = 256,
) -> Report:
    """Rank every user's `split` target ("valid" or "test") with the model and, with `popular`,
    the most-popular baseline. The sampled negatives depend on `seed` only, so every
    evaluation with one seed ranks against the same items."""
    if model is not None:
        vocab = model.config.vocab_size
    assert vocab is not None
    parts = rank_targets(model, data, split, block_size, vocab, seed, popular, batch_users)
    return report(split, len(data.history(split)), vocab, [parts])


BatchRanks = dict[str, list[tuple[int, Tensor, Tensor]]]  # system -> (batch, full, sampled)


@torch.no_grad()
def rank_targets(
    model: nn.Module | None,
    data: Histories,
    split: str,
    block_size: int,
    vocab: int,
    seed: int = 0,
    popular: bool = False,
    batch_users: int = 256,
    rank: int = 0,
    size: int = 1,
) -> BatchRanks:
    """The targets' ranks, full and sampled, in batches of users: batches rank, rank + size,
    ... of them (a process's share). Every share draws the negatives of every batch, so the
    random stream, and each user's negatives, are those of the whole evaluation."""
    histories, targets = data.history(split), data.targets(split)
    device = device_of(model) if model is not None else torch.device("cpu")
    pop = popularity(histories, vocab).to(device) if popular else None
    systems: BatchRanks = {}
    if model is not None:
        systems["qkv"] = []
    if pop is not None:
        systems["most popular"] = []
    gens = {name: torch.Generator().manual_seed(seed) for name in systems}
    for b, i in enumerate(range(0, len(histories), batch_users)):
        hist = histories[i : i + batch_users]
        target = torch.tensor(targets[i : i + batch_users], device=device)
        excluded = seen_mask(hist, vocab).to(device)
        excluded[:, : Items.first] = True
        excluded.scatter_(1, target[:, None], False)  # a target seen before is still ranked
        for name, rows in systems.items():
            negatives = sample_negatives(excluded, target, SAMPLED, gens[name])
            if b % size != rank:
                continue
            if name == "qkv":
                scores = next_item_scores(model, hist, block_size)
            else:
                scores = pop.expand(len(hist), -1)
            full = target_ranks(scores, target, excluded).cpu()
            rows.append((b, full, ranks_among(scores, target, negatives).cpu()))
    return systems


def report(split: str, users: int, vocab: int, parts: list[BatchRanks]) -> Report:
    """The report of the ranks of all shares (in batch order)."""
    metrics = {}
    for name in parts[0]:
        rows = sorted((r for part in parts for r in part[name]), key=lambda r: r[0])
        metrics[name] = Ranks([r[1] for r in rows], [r[2] for r in rows]).metrics()
    return Report(split, users, vocab - Items.first, metrics)


def block_size(model: nn.Module, meta: dict) -> int:
    """How many past items a next-item model reads (its training block size)."""
    return int(meta.get("block_size", model.config.max_len))


@dataclass
class Recommendation:
    item: int
    score: float  # the model's logit


def recommend(
    model: nn.Module,
    items: Items,
    histories: Sequence[Sequence[int]],
    block_size: int,
    k: int = 10,
    exclude_seen: bool = True,
) -> list[list[Recommendation]]:
    """The top k next items after each history (item ids, as in the data), best first."""
    encoded = [items.encode(list(h)) for h in histories]
    scores = next_item_scores(model, encoded, block_size).cpu()
    if exclude_seen:
        scores = scores.masked_fill(seen_mask(encoded, scores.shape[1]), -math.inf)
    k = min(k, items.n_items)
    top = scores.topk(k, dim=1)
    return [
        [
            Recommendation(items.item_of(int(i)), float(s))
            for s, i in zip(vals, idx, strict=True)
            if s > -math.inf
        ]
        for vals, idx in zip(top.values, top.indices, strict=True)
    ]
