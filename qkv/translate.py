"""Translate text with a trained model: tokenize, sort by length, batch, search, detokenize."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .models import EncoderDecoder
from .packed import pack
from .search import BeamTrace, Hypothesis, Limits, beam_search, greedy, model_step
from .tokenizer import Subwords


@dataclass(frozen=True)
class DecodeOptions:
    beam: int = 5
    alpha: float = 0.6  # length penalty exponent
    penalty: str = "gnmt"  # or "power" (L^alpha, as fairseq and HF transformers)
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
    """A model plus its tokenizer, ready to turn sentences into translations.

    The model's linear layers are packed for fast CPU inference, in place (qkv.packed: the same
    function; with `int8`, weights quantized to 8 bits, faster and slightly less accurate)."""

    def __init__(self, model: EncoderDecoder, tokenizer: Subwords, int8: bool = False):
        self.model, self.tok = pack(model, int8), tokenizer
        self.cfg = model.config

    def encode_sources(self, sentences: Sequence[str]) -> list[list[int]]:
        limit = self.cfg.max_len - 1
        return [ids[:limit] + [self.cfg.eos_id] for ids in self.tok.encode_batch(sentences)]

    @torch.inference_mode()
    def translate_ids(
        self,
        sources: Sequence[list[int]],
        opts: DecodeOptions,
        trees: dict[int, list[dict]] | None = None,
    ) -> list[list[Hypothesis]]:
        """Token ids in, n-best hypotheses out, in input order. Given a dict, `trees` receives
        each sentence's beam-search tree (see search.BeamTrace), keyed by input position."""
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
                pad=self.cfg.pad_id,
            )
            trace = None
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
                trace = BeamTrace() if trees is not None else None
                batch = beam_search(
                    step,
                    cache,
                    lengths,
                    beam=opts.beam,
                    alpha=opts.alpha,
                    penalty=opts.penalty,
                    nbest=opts.nbest,
                    trace=trace,
                    **common,
                )
            for row, (i, hyps) in enumerate(zip(idx, batch, strict=True)):
                results[i] = hyps
                if trees is not None and trace is not None:
                    trees[i] = trace.trees[row]
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

    def trace(self, sentences: Sequence[str], opts: DecodeOptions) -> dict:
        """Beam search with every candidate recorded: the data of the beam-tree page."""
        if opts.greedy or opts.sample or opts.beam < 2:
            raise ValueError("a beam-search trace needs --beam 2 or more")
        trees: dict[int, list[dict]] = {}
        results = self.translate_ids(self.encode_sources(sentences), opts, trees)
        out = []
        for i, (source, hyps) in enumerate(zip(sentences, results, strict=True)):
            tree = trees[i]
            finished = sorted(
                (n for n in tree if n["kept"] == "finished"), key=lambda n: -n["score"]
            )
            nodes = [dict(n, text=self.tok.id_to_token(n["token"])) for n in tree]
            nbest = []
            for node, h in zip(finished, hyps, strict=False):
                nbest.append(
                    dict(
                        node=node["id"],
                        text=self.tok.decode(h.tokens),
                        tokens=h.tokens,
                        score=h.score,
                        log_prob=h.log_prob,
                    )
                )
            out.append(dict(source=source, nodes=nodes, nbest=nbest))
        return {"beam": opts.beam, "alpha": opts.alpha, "sentences": out}
