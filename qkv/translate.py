"""Translate text with a trained model: tokenize, sort by length, batch, decode, detokenize.

The model is used as it is given, on its own device: nothing here changes it. For fast CPU
inference, `qkv.pack(model)` it first (the commands do).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import DecodeConfig
from .fixed import FixedDecoder, bucket
from .models import EncoderDecoder, device_of
from .search import BeamTrace, Hypothesis, decode, max_steps, model_step
from .tokenizer import Tokenizer


@dataclass
class Translation:
    text: str
    score: float


class Translator:
    """A model plus its tokenizer, ready to turn sentences into translations."""

    def __init__(
        self,
        model: EncoderDecoder,
        tokenizer: Tokenizer,
        batch_size: int = 64,
        fixed: FixedDecoder | None = None,
    ):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.config = model.config
        self.fixed = fixed  # fixed-shape (compiled) decoding instead of the eager step

    def encode_sources(self, sentences: Sequence[str]) -> list[list[int]]:
        limit = self.config.max_len - 1
        ids = self.tokenizer.encode_batch(list(sentences))
        return [s[:limit] + [self.config.eos_id] for s in ids]

    @torch.inference_mode()
    def translate_ids(
        self,
        sources: Sequence[list[int]],
        cfg: DecodeConfig,
        trees: dict[int, list[dict[str, Any]]] | None = None,
    ) -> list[list[Hypothesis]]:
        """Token ids in, n-best hypotheses out, in input order. Given a dict, `trees` receives
        each sentence's beam-search tree (search.BeamTrace) of this same search, keyed by input
        position."""
        mc, device = self.config, device_of(self.model)
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        results: list[list[Hypothesis]] = [[] for _ in sources]
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            lengths = torch.tensor([len(sources[i]) for i in idx], device=device)
            src = torch.full((len(idx), int(lengths.max())), mc.pad_id, dtype=torch.long)
            for row, i in enumerate(idx):
                src[row, : len(sources[i])] = torch.tensor(sources[i])
            trace = BeamTrace() if trees is not None else None
            step, state, lengths = self._start(src.to(device), lengths, cfg)
            batch = decode(
                step,
                state,
                lengths,
                cfg,
                bos=mc.bos_id,
                eos=mc.eos_id,
                pad=mc.pad_id,
                max_positions=mc.max_len,
                trace=trace,
            )
            for row, (i, hyps) in enumerate(zip(idx, batch[: len(idx)], strict=True)):
                results[i] = hyps
                if trees is not None and trace is not None:
                    trees[i] = trace.trees[row]
        return results

    def _start(self, src: Tensor, lengths: Tensor, cfg: DecodeConfig) -> tuple[Any, Any, Tensor]:
        """The search's step function and state for one batch (and its lengths). Fixed-shape
        decoding pads the batch to bucketed shapes (rows, source length, steps), so that a
        compiled step sees few distinct shapes; the padding rows repeat the first sentence and
        their outputs are dropped. Sampling stays eager: its random draws depend on the rows."""
        if self.fixed is None or cfg.strategy == "sample":
            steps = max_steps(cfg, lengths, self.config.max_len)  # room reserved: no growth
            return model_step(self.model), self.model.start(src, steps), lengths
        rows, s = self.batch_size - len(src), bucket(src.shape[1], 8) - src.shape[1]
        src = torch.cat([src, src[:1].expand(rows, -1)]) if rows > 0 else src
        src = F.pad(src, (0, s), value=self.config.pad_id)
        lengths = torch.cat([lengths, lengths[:1].expand(max(rows, 0))])
        steps = bucket(max_steps(cfg, lengths, self.config.max_len), 16)
        step, state = self.fixed.start(src, steps, cfg.beam if cfg.strategy == "beam" else 1)
        return step, state, lengths

    def translate(self, sentences: Sequence[str], cfg: DecodeConfig) -> list[list[Translation]]:
        hyps = self.translate_ids(self.encode_sources(sentences), cfg)
        return [self.texts(nbest) for nbest in hyps]

    def translate_best(self, sentences: Sequence[str], cfg: DecodeConfig) -> list[str]:
        return [nbest[0].text for nbest in self.translate(sentences, cfg)]

    def traced(
        self, sentences: Sequence[str], cfg: DecodeConfig
    ) -> tuple[list[list[Translation]], dict[str, Any]]:
        """Beam search with every candidate recorded: the translations and, from the same
        search, the data of the beam-tree page."""
        trees: dict[int, list[dict[str, Any]]] = {}
        results = self.translate_ids(self.encode_sources(sentences), cfg, trees)
        out = []
        for i, (source, hyps) in enumerate(zip(sentences, results, strict=True)):
            tree = trees[i]
            finished = sorted(
                (n for n in tree if n["kept"] == "finished"), key=lambda n: -n["score"]
            )
            nodes = [dict(n, text=self.tokenizer.id_to_token(n["token"])) for n in tree]
            nbest = [
                dict(
                    node=node["id"],
                    text=self.tokenizer.decode(h.tokens),
                    tokens=h.tokens,
                    score=h.score,
                    log_prob=h.log_prob,
                )
                for node, h in zip(finished, hyps, strict=False)
            ]
            out.append(dict(source=source, nodes=nodes, nbest=nbest))
        data = {"beam": cfg.beam, "alpha": cfg.alpha, "sentences": out}
        return [self.texts(nbest) for nbest in results], data

    def texts(self, nbest: list[Hypothesis]) -> list[Translation]:
        """Hypotheses as detokenized text with their scores."""
        return [Translation(self.tokenizer.decode(h.tokens), h.score) for h in nbest]
