"""Scores: sacreBLEU and chrF on detokenized, cased text (with their signatures), plus the
lowercased, tokenized BLEU that older papers report; Pearson and Spearman correlation
(similarity); accuracy, per-class precision/recall/F1 and the confusion matrix (classification)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sacrebleu.metrics import BLEU, CHRF


@dataclass
class Scores:
    bleu: float
    chrf: float
    bleu_lc_tok: float
    bleu_signature: str
    chrf_signature: str
    bleu_lc_tok_signature: str

    def summary(self) -> str:
        return (
            f"BLEU {self.bleu:.2f} ({self.bleu_signature})\n"
            f"chrF {self.chrf:.2f} ({self.chrf_signature})\n"
            f"BLEU lowercased, tokenized {self.bleu_lc_tok:.2f} ({self.bleu_lc_tok_signature})"
        )


def bleu_tokenizer(target_lang: str | None) -> str:
    """sacreBLEU's tokenizer for a target language: Chinese has no spaces between words, so its
    BLEU splits every Chinese character off ("zh", as WMT scores Chinese); else the default."""
    return "zh" if target_lang == "zh" else "13a"


def score(
    hypotheses: Sequence[str], references: Sequence[str], target_lang: str | None = None
) -> Scores:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    refs = [list(references)]
    tokenize = bleu_tokenizer(target_lang)
    bleu, chrf = BLEU(tokenize=tokenize), CHRF()
    # lowercased tokens: the older papers' multi-bleu on lowercased, tokenized text
    lc = BLEU(lowercase=True, tokenize=tokenize)
    b, c, low = (m.corpus_score(list(hypotheses), refs) for m in (bleu, chrf, lc))
    return Scores(
        b.score,
        c.score,
        low.score,
        str(bleu.get_signature()),
        str(chrf.get_signature()),
        str(lc.get_signature()),
    )


def bleu(
    hypotheses: Sequence[str], references: Sequence[str], target_lang: str | None = None
) -> float:
    metric = BLEU(tokenize=bleu_tokenizer(target_lang))
    return metric.corpus_score(list(hypotheses), [list(references)]).score


@dataclass
class Evaluation:
    hypotheses: list[str]
    scores: Scores
    seconds: float  # translating only

    def sentences_per_second(self) -> float:
        return len(self.hypotheses) / max(self.seconds, 1e-9)


def evaluate_translations(
    translate: Callable[[list[str]], list[str]],
    pairs: Sequence[tuple[str, str]],
    target_lang: str | None = None,
) -> Evaluation:
    """Translate the sources of (source, reference) pairs, time it, and score the result."""
    t0 = time.monotonic()
    hyps = translate([s for s, _ in pairs])
    seconds = time.monotonic() - t0
    return Evaluation(hyps, score(hyps, [t for _, t in pairs], target_lang), seconds)


# --- sentence tasks: correlation and classification reports ---------------------------------


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's correlation coefficient (0 when either side is constant)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"need two equally long sequences of 2+ values, got {len(a)}, {len(b)}")
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def ranks(x: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    a = np.asarray(x, dtype=np.float64)
    order = np.argsort(a, kind="stable")
    r = np.empty(len(a))
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and a[order[j + 1]] == a[order[i]]:
            j += 1
        r[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's on the ranks (ties averaged)."""
    return pearson(ranks(x), ranks(y))


@dataclass
class ClassReport:
    labels: list[str]
    confusion: np.ndarray  # [gold, predicted] counts

    @property
    def accuracy(self) -> float:
        return 100 * float(np.trace(self.confusion)) / max(int(self.confusion.sum()), 1)

    def per_class(self) -> list[tuple[str, float, float, float, int]]:
        """(label, precision, recall, F1, support) per class, in percent."""
        c, rows = self.confusion, []
        for i, label in enumerate(self.labels):
            tp, predicted, gold = c[i, i], c[:, i].sum(), c[i, :].sum()
            p = 100 * tp / predicted if predicted else 0.0
            r = 100 * tp / gold if gold else 0.0
            f1 = 2 * p * r / (p + r) if p + r else 0.0
            rows.append((label, float(p), float(r), float(f1), int(gold)))
        return rows

    def summary(self) -> str:
        width = max(9, *(len(x) for x in self.labels))
        lines = [f"accuracy {self.accuracy:.2f} % of {int(self.confusion.sum())}", ""]
        lines.append(f"{'class':<{width}}  precision  recall     F1  support")
        for label, p, r, f1, n in self.per_class():
            lines.append(f"{label:<{width}}  {p:9.2f}  {r:6.2f}  {f1:5.2f}  {n:7d}")
        lines += ["", "confusion (rows: true class, columns: predicted)"]
        lines.append(" " * width + "".join(f"  {x[:9]:>9}" for x in self.labels))
        for label, row in zip(self.labels, self.confusion, strict=True):
            lines.append(f"{label:<{width}}" + "".join(f"  {int(v):9d}" for v in row))
        return "\n".join(lines)


def class_report(
    gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]
) -> ClassReport:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix."""
    index = {x: i for i, x in enumerate(labels)}
    c = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for g, p in zip(gold, predicted, strict=True):
        c[index[g], index[p]] += 1
    return ClassReport(list(labels), c)
