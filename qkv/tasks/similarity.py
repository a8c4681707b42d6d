"""Semantic similarity: a bi-encoder. The same encoder reads both sentences of a pair, each is
pooled into one vector, and the cosine of the two vectors is the predicted similarity.

Training uses CoSENT (Su 2022): for every two pairs of a batch whose gold scores are ordered,
the loss pushes their cosines into the same order, log(1 + sum exp(scale * (cos_lo - cos_hi))).
It needs no mapping of scores onto cosines, only their order, which is what Spearman measures.
With `paraphrases`, batches of (English caption, its German/French/Czech
translation) pairs are mixed in, learned with in-batch negatives: each caption should be closer
to its own translation than to the batch's other ones (a free source of meaning-preserving pairs);
`paraphrase_tsv` adds the user's own pairs the same way (bench/backtranslate.sh makes English
ones from Multi30k with the two translation models).

Validation: Spearman (the metric that picks best/) and Pearson x 100, overall and per genre.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig, TrainConfig
from ..data import (
    DataError,
    Example,
    local_dataset_file,
    multi30k,
    pad_batch,
    read_lines,
    token_batches,
)
from ..evaluate import pearson, spearman
from ..models import device_of
from ..sentences import embed
from . import encoder_start, sentence_limit


@dataclass
class ScoredPair:
    a: str
    b: str
    score: float
    genre: str = ""


STSB_SPLITS = ("train", "dev", "test")
COSENT_SCALE = 20.0  # cosines live in [-1, 1]; the scale makes their differences count
CONTRASTIVE_SCALE = 20.0
SIF_A = 1e-3  # SIF's smoothing constant, the value its paper found best


def read_scored(path: str | Path, score_range: tuple[float, float]) -> list[ScoredPair]:
    """`a<TAB>b<TAB>score[<TAB>genre]` lines; DataError naming the file and line on a missing
    column, a score that is not a number or one outside score_range."""
    low, high = score_range
    rows = []
    for i, line in enumerate(read_lines(path), 1):
        cols = line.split("\t")
        if len(cols) < 3:
            raise DataError(f"{path}:{i}: expected sentence1<TAB>sentence2<TAB>score")
        try:
            rows.append(
                _pair(cols[0], cols[1], cols[2], cols[3] if len(cols) > 3 else "", low, high)
            )
        except DataError as e:
            raise DataError(f"{path}:{i}: {e}") from None
        if not rows[-1].a or not rows[-1].b:
            raise DataError(f"{path}:{i}: empty sentence")
    return rows


def read_paraphrases(path: str | Path) -> list[tuple[str, str]]:
    """`a<TAB>b` lines of sentences that mean the same; DataError naming the file and line."""
    pairs = []
    for i, line in enumerate(read_lines(path), 1):
        cols = [c.strip() for c in line.split("\t")]
        if len(cols) < 2 or not cols[0] or not cols[1]:
            raise DataError(f"{path}:{i}: expected sentence1<TAB>sentence2")
        pairs.append((cols[0], cols[1]))
    return pairs


def _pair(a: str, b: str, score: str, genre: str, low: float, high: float) -> ScoredPair:
    try:
        value = float(score)
    except ValueError:
        raise DataError(f"score {score!r} is not a number") from None
    if not low <= value <= high:
        raise DataError(f"score {value:g} is outside the range [{low:g}, {high:g}]")
    return ScoredPair(a.strip(), b.strip(), value, genre.strip())


def stsb(split: str, data_dir: str | Path | None = None) -> list[ScoredPair]:
    """An STS Benchmark split as its README says: tab-separated, the first 7 fields (genre,
    source file, year, id, score, sentence 1, sentence 2), no quote parsing."""
    if split not in STSB_SPLITS:
        raise DataError(f"stsb has no split {split!r} (choose from {', '.join(STSB_SPLITS)})")
    path = local_dataset_file(f"stsb/sts-{split}.csv.gz", data_dir)
    rows = []
    for i, line in enumerate(read_lines(path), 1):
        cols = line.split("\t")
        if len(cols) < 7:
            raise DataError(f"{path}:{i}: expected 7 tab-separated fields")
        try:
            rows.append(_pair(cols[5], cols[6], cols[4], cols[0].removeprefix("main-"), 0, 5))
        except DataError as e:
            raise DataError(f"{path}:{i}: {e}") from None
    return rows


def paraphrase_pairs(data_dir: str | Path | None = None) -> list[tuple[str, str]]:
    """Multi30k's training captions: each English caption with its German, French and Czech
    translations, as pairs that mean the same."""
    english = [en for en, _ in multi30k("train", "en", "de", data_dir)]
    pairs = []
    for lang in ("de", "fr", "cs"):
        other = [x for _, x in multi30k("train", "en", lang, data_dir)]
        pairs += list(zip(english, other, strict=True))
    return pairs


def correlations(
    predicted: list[float], rows: list[ScoredPair], prefix: str = ""
) -> dict[str, float]:
    """Spearman and Pearson x 100 of predicted vs gold scores, overall and per genre."""
    gold = [r.score for r in rows]
    out = {f"{prefix}spearman": 100 * spearman(predicted, gold)}
    out[f"{prefix}pearson"] = 100 * pearson(predicted, gold)
    by_genre: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        if r.genre:
            by_genre[r.genre].append(i)
    for genre, idx in sorted(by_genre.items()):
        if len(idx) > 2 and len(by_genre) > 1:
            g, p = [gold[i] for i in idx], [predicted[i] for i in idx]
            out[f"{prefix}spearman_{genre}"] = 100 * spearman(p, g)
            out[f"{prefix}pearson_{genre}"] = 100 * pearson(p, g)
    return out


def cosent(cos: Tensor, gold: Tensor, scale: float = COSENT_SCALE) -> Tensor:
    """log(1 + sum over pairs (i, j) with gold_i > gold_j of exp(scale * (cos_j - cos_i)))."""
    diff = scale * (cos[None, :] - cos[:, None])  # [i, j] = scale * (cos_j - cos_i)
    ordered = gold[:, None] > gold[None, :]
    terms = diff[ordered]
    zero = torch.zeros(1, dtype=cos.dtype, device=cos.device)
    return torch.logsumexp(torch.cat([zero, terms]), dim=0)


@dataclass
class PairBatch:
    a: Tensor  # (B, S) ids
    b: Tensor  # (B, S') ids
    scores: Tensor | None  # (B,) gold scores; None: translation pairs (in-batch negatives)
    tokens: int  # pairs

    def to(self, device: torch.device | str) -> PairBatch:
        s = None if self.scores is None else self.scores.to(device)
        return PairBatch(self.a.to(device), self.b.to(device), s, self.tokens)


class Similarity:
    """The bi-encoder similarity task for the training loop."""

    name = "similarity"
    metric = "valid_spearman"
    maximize = True
    unit = "pairs"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.tokenizer = None

    def _rows(self) -> tuple[list[ScoredPair], list[ScoredPair], str]:
        cfg = self.cfg
        valid = read_scored(cfg.valid_tsv_file, cfg.score_range) if cfg.valid_tsv_file else None
        if cfg.tsv_file:
            train = read_scored(cfg.tsv_file, cfg.score_range)
            if valid is None:
                n = min(1000, max(3, len(train) // 10))
                return train[:-n], train[-n:], f"{cfg.tsv_file} (last {n})"
            return train, valid, str(cfg.valid_tsv_file)
        return stsb("train", cfg.data_dir), valid or stsb("dev", cfg.data_dir), "sts-dev"

    def prepare(self, base: ModelConfig, out: Path, resume: bool, log) -> ModelConfig:
        cfg = self.cfg
        train, valid, valid_name = self._rows()
        if len({r.score for r in train}) < 2:
            raise DataError("the training pairs all have the same score: nothing to learn")
        para = paraphrase_pairs(cfg.data_dir) if cfg.paraphrases else []
        if cfg.paraphrase_tsv:
            para += read_paraphrases(cfg.paraphrase_tsv)
        texts = [s for r in train for s in (r.a, r.b)] + [s for p in para for s in p]
        tok, base = encoder_start(cfg, base, texts, out, resume)
        self.tokenizer = tok
        self.limit = limit = sentence_limit(cfg, base)
        self.train_set = self._examples(tok, [(r.a, r.b) for r in train])
        self.scores = [r.score for r in train]
        self.para_set = self._examples(tok, para)
        self.valid_rows = valid
        self.valid_set = self._examples(tok, [(r.a, r.b) for r in valid])
        log(
            f"data: {len(self.train_set):,} scored training pairs, {len(self.para_set):,} "
            f"paraphrase pairs, {len(valid):,} validation ({valid_name}); "
            f"vocabulary {tok.vocab_size:,}"
        )
        self.model_cfg = base.replace(
            arch="encoder-only",
            tgt_vocab_size=None,
            n_decoder_layers=0,
            n_classes=None,
            max_len=max(base.max_len, limit + 1),
        )
        return self.model_cfg

    def init_model(self, model: nn.Module) -> None:
        """Weights for "weighted" pooling from the training text's token frequencies p:
        SIF's a / (a + p) (Arora et al. 2017), so frequent tokens (the, a, .) count less."""
        ids = [i for e in self.train_set + self.para_set for i in e.src + e.tgt]
        counts = torch.bincount(
            torch.tensor(ids, dtype=torch.long), minlength=len(model.token_weight)
        )
        p = counts.float() / max(len(ids), 1)
        model.token_weight.copy_(SIF_A / (SIF_A + p))

    def _examples(self, tok, pairs: list[tuple[str, str]]) -> list[Example]:
        a = tok.encode_batch([x for x, _ in pairs])
        b = tok.encode_batch([y for _, y in pairs])
        return [Example(x[: self.limit], y[: self.limit]) for x, y in zip(a, b, strict=True)]

    def batches(self, epoch: int) -> list[list[int]]:
        """The scored pairs' batches, and the translation pairs' (indices offset past the
        scored ones), shuffled together. Translation batches are random, not length-sorted:
        their other captions are the negatives, and similar lengths would make them easy."""
        cfg = self.cfg
        sts = token_batches(self.train_set, cfg.max_tokens, cfg.seed, epoch)
        if not self.para_set:
            return sts
        rng = np.random.default_rng([cfg.seed, epoch, 1])
        n, per_batch = len(self.train_set), max(2, cfg.max_tokens // 32)
        order = rng.permutation(len(self.para_set)) + n
        para = [order[i : i + per_batch].tolist() for i in range(0, len(order), per_batch)]
        everything = sts + para
        return [everything[i] for i in rng.permutation(len(everything))]

    def collate(self, indices: list[int]) -> PairBatch:
        n, mc = len(self.train_set), self.model_cfg
        if indices[0] >= n:
            examples = [self.para_set[i - n] for i in indices]
            scores = None
        else:
            examples = [self.train_set[i] for i in indices]
            scores = torch.tensor([self.scores[i] for i in indices])
        a = pad_batch([e.src for e in examples], mc.pad_id, mc.eos_id)
        b = pad_batch([e.tgt for e in examples], mc.pad_id, mc.eos_id)
        return PairBatch(a, b, scores, len(examples))

    def loss(self, model: nn.Module, batch: PairBatch) -> Tensor:
        """Summed over the batch's pairs: the batch's loss times its size (the loop divides)."""
        ea, eb = embed(model, batch.a).float(), embed(model, batch.b).float()
        if batch.scores is None:  # in-batch negatives, both directions
            sim = CONTRASTIVE_SCALE * F.normalize(ea, dim=-1) @ F.normalize(eb, dim=-1).T
            target = torch.arange(len(sim), device=sim.device)
            loss = (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target)) / 2
        else:
            loss = cosent(F.cosine_similarity(ea, eb, dim=-1), batch.scores)
        return loss * batch.tokens

    def predict(
        self, model: nn.Module, examples: list[Example], rank: int = 0, size: int = 1
    ) -> dict[int, float]:
        """Cosine similarity of each pair, by its index (every size-th batch from rank's)."""
        device, mc = device_of(model), self.model_cfg
        out: dict[int, float] = {}
        batches = token_batches(examples, self.cfg.max_tokens, 0, 0, shuffle=False)
        for idx in batches[rank::size]:
            a = pad_batch([examples[i].src for i in idx], mc.pad_id, mc.eos_id).to(device)
            b = pad_batch([examples[i].tgt for i in idx], mc.pad_id, mc.eos_id).to(device)
            cos = F.cosine_similarity(embed(model, a).float(), embed(model, b).float(), dim=-1)
            out.update(zip(idx, cos.tolist(), strict=True))
        return out

    def validate(self, model: nn.Module) -> dict[str, float]:
        return self.validate_merge([self.validate_part(model, 0, 1)])

    def validate_part(self, model: nn.Module, rank: int, size: int) -> dict[int, float]:
        return self.predict(model, self.valid_set, rank, size)

    def validate_merge(self, parts: list[dict[int, float]]) -> dict[str, float]:
        cos = {i: c for part in parts for i, c in part.items()}
        predicted = [cos[i] for i in range(len(self.valid_set))]
        return correlations(predicted, self.valid_rows, "valid_")

    def meta(self) -> dict[str, Any]:
        return {"score_range": list(self.cfg.score_range)}
