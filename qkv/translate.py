"""Translate text with a trained model: tokenize, sort by length, batch, search, detokenize."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .models import EncoderDecoder
from .search import BeamTrace, Hypothesis, Limits, beam_search, greedy, model_step
from .tokenizer import Subwords


@dataclass(frozen=True)
class DecodeOptions:
    beam: int = 5
    alpha: float = 0.6  # GNMT length penalty
    nbest: int = 1
    greedy: bool = False
    sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_len_a: float = 1.5
    max_len_b: int = 10
    min_len: int = 0
    no_repeat_ngram: int = 0
    batch_size: int = 64
    seed: int = 0


@dataclass
class Translation:
    text: str
    score: float
    tokens: list[int]


class Translator:
    """A model plus its tokenizer, ready to turn sentences into translations."""

    def __init__(self, model: EncoderDecoder, tokenizer: Subwords):
        self.model, self.tok = model.eval(), tokenizer
        self.cfg = model.config

    def encode_sources(self, sentences: Sequence[str]) -> list[list[int]]:
        limit = self.cfg.max_len - 1
        return [ids[:limit] + [self.cfg.eos_id] for ids in self.tok.encode_batch(sentences)]

    @torch.inference_mode()
    def translate_ids(
        self, sources: Sequence[list[int]], opts: DecodeOptions, trace: BeamTrace | None = None
    ) -> list[list[Hypothesis]]:
        """Token ids in, n-best hypotheses out, in input order."""
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        results: list[list[Hypothesis]] = [[] for _ in sources]
        limits = Limits(opts.max_len_a, opts.max_len_b, opts.min_len, cap=self.cfg.max_len - 1)
        gen = torch.Generator().manual_seed(opts.seed)
        step = model_step(self.model)
        for start in range(0, len(order), opts.batch_size):
            idx = order[start : start + opts.batch_size]
            lengths = torch.tensor([len(sources[i]) for i in idx])
            src = torch.full((len(idx), int(lengths.max())), self.cfg.pad_id, dtype=torch.long)
            for row, i in enumerate(idx):
                src[row, : len(sources[i])] = torch.tensor(sources[i])
            cache = self.model.start(src)
            common = dict(
                bos=self.cfg.bos_id,
                eos=self.cfg.eos_id,
                limits=limits,
                no_repeat=opts.no_repeat_ngram,
            )
            if opts.greedy or opts.sample or opts.beam == 1:
                hyps = greedy(
                    step,
                    cache,
                    lengths,
                    sample=opts.sample,
                    temperature=opts.temperature,
                    top_k=opts.top_k,
                    top_p=opts.top_p,
                    generator=gen,
                    **common,
                )
                batch = [[h] for h in hyps]
            else:
                batch = beam_search(
                    step,
                    cache,
                    lengths,
                    beam=opts.beam,
                    alpha=opts.alpha,
                    nbest=opts.nbest,
                    trace=trace,
                    **common,
                )
            for i, hyps in zip(idx, batch, strict=True):
                results[i] = hyps
        return results

    def translate(
        self, sentences: Sequence[str], opts: DecodeOptions = DecodeOptions()
    ) -> list[list[Translation]]:
        hyps = self.translate_ids(self.encode_sources(sentences), opts)
        return [
            [Translation(self.tok.decode(h.tokens), h.score, h.tokens) for h in nbest]
            for nbest in hyps
        ]

    def translate_best(
        self, sentences: Sequence[str], opts: DecodeOptions = DecodeOptions()
    ) -> list[str]:
        return [nbest[0].text for nbest in self.translate(sentences, opts)]
