"""Scores: sacreBLEU and chrF on detokenized, cased text (with their signatures), plus the
lowercased, tokenized BLEU that older papers report."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


def score(hypotheses: Sequence[str], references: Sequence[str]) -> Scores:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    refs = [list(references)]
    bleu, chrf = BLEU(), CHRF()
    # lowercased 13a tokens: the older papers' multi-bleu on lowercased, tokenized text
    lc = BLEU(lowercase=True, tokenize="13a")
    b, c, low = (m.corpus_score(list(hypotheses), refs) for m in (bleu, chrf, lc))
    return Scores(
        b.score,
        c.score,
        low.score,
        str(bleu.get_signature()),
        str(chrf.get_signature()),
        str(lc.get_signature()),
    )


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    return BLEU().corpus_score(list(hypotheses), [list(references)]).score


@dataclass
class Evaluation:
    hypotheses: list[str]
    scores: Scores
    seconds: float  # translating only

    def sentences_per_second(self) -> float:
        return len(self.hypotheses) / max(self.seconds, 1e-9)


def evaluate_translations(
    translate: Callable[[list[str]], list[str]], pairs: Sequence[tuple[str, str]]
) -> Evaluation:
    """Translate the sources of (source, reference) pairs, time it, and score the result."""
    t0 = time.monotonic()
    hyps = translate([s for s, _ in pairs])
    seconds = time.monotonic() - t0
    return Evaluation(hyps, score(hyps, [t for _, t in pairs]), seconds)
