"""Text generation with a decoder-only language model: the prompt is read into the KV cache in one
step, then each new token is chosen from the next-token probabilities (greedy, sampling or beam
search, as a DecodeConfig says: qkv.search.decode) and fed back, one position at a time.

The context: a model has `max_len` positions. When the prompt plus the output would pass them,
greedy and sampling *slide*: the last half of the context is read again as a new prompt (one
forward pass) and generation goes on, so later tokens see between half and all of the context.
Beam search stops at the context instead. (nanoGPT slides by one token, re-running the whole
context for every token: the same outputs while the context is not full.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .config import DecodeConfig
from .models import DecoderOnly, device_of
from .search import decode, model_step
from .tokenizer import Characters, Tokenizer

# Called with (prompt index, text so far) while greedy or sampling runs: streaming output.
OnText = Callable[[int, str], None]


class PromptError(ValueError):
    """A prompt the model cannot read (empty, or characters outside its vocabulary)."""


@dataclass
class Generation:
    prompt: str
    text: str  # the continuation, without the prompt
    tokens: list[int]
    log_prob: float  # of the generated tokens under the model
    ended: bool  # the model produced end-of-sequence (else the token limit was reached)
    slid: int  # how many times the context slid


class Generator:
    """A decoder-only model and its tokenizer, generating continuations of prompts."""

    def __init__(self, model: DecoderOnly, tokenizer: Tokenizer, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.config = model.config

    @property
    def context(self) -> int:
        return self.config.max_len

    def encode(self, prompt: str) -> list[int]:
        if not prompt:
            raise PromptError("the prompt is empty (give at least one character, e.g. a newline)")
        if isinstance(self.tokenizer, Characters):
            outside = self.tokenizer.unknown(prompt)
            if outside:
                raise PromptError(f"the prompt has characters the model does not know: {outside}")
        return self.tokenizer.encode_batch([prompt])[0]

    def would_slide(self, prompt_tokens: int, max_new_tokens: int) -> bool:
        return prompt_tokens + max_new_tokens > self.context

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        cfg: DecodeConfig,
        max_new_tokens: int,
        on_text: OnText | None = None,
    ) -> list[Generation]:
        """A continuation of each prompt, up to max_new_tokens or end-of-sequence. Prompts of the
        same token length are decoded as one batch. `on_text` (greedy and sampling) is called
        as tokens arrive."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if cfg.nbest != 1:
            raise ValueError("generate gives one output per prompt (nbest 1)")
        ids = [self.encode(p) for p in prompts]
        results: list[Generation | None] = [None] * len(prompts)
        by_length: dict[int, list[int]] = {}
        for i, x in enumerate(ids):
            by_length.setdefault(len(x), []).append(i)
        for group in by_length.values():
            for j in range(0, len(group), self.batch_size):
                rows = group[j : j + self.batch_size]
                for i, g in zip(
                    rows,
                    self._batch([ids[i] for i in rows], cfg, max_new_tokens, on_text, rows),
                    strict=True,
                ):
                    results[i] = Generation(prompts[i], self.tokenizer.decode(g[0]), *g)
        return [r for r in results if r is not None]

    def _batch(
        self,
        prompts: list[list[int]],
        cfg: DecodeConfig,
        max_new_tokens: int,
        on_text: OnText | None,
        names: list[int],
    ) -> list[tuple[list[int], float, bool, int]]:
        """Prompts of one length -> (tokens, log_prob, ended, slides) each, sliding as needed."""
        mc, device = self.config, device_of(self.model)
        n = len(prompts)
        out: list[list[int]] = [[] for _ in range(n)]
        log_prob, ended, slides = [0.0] * n, [False] * n, [0] * n
        live = list(range(n))  # rows still generating
        half = max(self.context // 2, 1)
        context = [list(p) for p in prompts]  # what the next segment reads as its prompt
        if len(prompts[0]) >= self.context:  # a prompt longer than the context: its end
            if cfg.strategy == "beam":
                raise PromptError(f"the prompt passes the model's context of {self.context}")
            context = [p[-half:] for p in prompts]
            slides = [1] * n
        segment = 0
        while live:
            room = self.context - len(context[live[0]])
            if cfg.strategy == "beam" and segment > 0:
                break
            want = max_new_tokens - len(out[live[0]])
            seg_cfg = cfg.replace(
                max_len_a=0.0,
                max_len_b=min(want, room),
                at_max="stop",
                seed=cfg.seed + segment,
            )
            emit = None
            if on_text is not None and cfg.strategy != "beam":
                emit = self._emitter(live, out, on_text, names)
            prefix = torch.tensor([context[r] for r in live], device=device)
            hyps = decode(
                model_step(self.model),
                self.model.start(),
                torch.zeros(len(live), dtype=torch.long, device=device),
                seg_cfg,
                bos=mc.bos_id,
                eos=mc.eos_id,
                pad=mc.pad_id,
                prefix=prefix,
                emit=emit,
            )
            still = []
            for r, nbest in zip(live, hyps, strict=True):
                h = nbest[0]
                if emit is None:
                    out[r].extend(h.tokens)
                log_prob[r] += h.log_prob
                if len(h.tokens) < seg_cfg.max_len_b:
                    ended[r] = True
                elif len(out[r]) < max_new_tokens:
                    still.append(r)
            # slide: the next segment reads the last half of the context again
            for r in still:
                context[r] = (prompts[r] + out[r])[-half:]
                slides[r] += 1
            live, segment = still, segment + 1
        return [(out[r], log_prob[r], ended[r], slides[r]) for r in range(n)]

    def _emitter(self, live, out, on_text, names):
        """An emit callback that appends the new tokens and reports each row's text so far."""

        def emit(pairs: list[tuple[int, int]]) -> None:
            for row, tok in pairs:
                r = live[row]
                out[r].append(tok)
                on_text(names[r], self.tokenizer.decode(out[r]))

        return emit
