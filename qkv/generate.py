"""Text generation with a decoder-only language model: the prompt is read into the KV cache in one
step, then each new token is chosen from the next-token probabilities (greedy, sampling or beam
search, as a DecodeConfig says: qkv.search.decode) and fed back, one position at a time.

Prompts of different lengths share a batch left-padded: the cache's `offsets` tell the model how
many pads each row starts with, so it hides them and counts positions from the first real token
(tests/test_lm.py checks that a padded row's logits equal the row's alone).

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
        """A continuation of each prompt, up to max_new_tokens or end-of-sequence, batch_size
        prompts at a time (of any lengths). `on_text` (greedy and sampling) is called as tokens
        arrive."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if cfg.nbest != 1:
            raise ValueError("generate gives one output per prompt (nbest 1)")
        ids = [self.encode(p) for p in prompts]
        results: list[Generation] = []
        for j in range(0, len(ids), self.batch_size):
            rows = list(range(j, min(j + self.batch_size, len(ids))))
            # each batch its own random stream, so a prompt repeated in two batches differs
            batch_cfg = cfg.replace(seed=cfg.seed + 100_003 * (j // self.batch_size))
            done = self._batch([ids[i] for i in rows], batch_cfg, max_new_tokens, on_text, rows)
            for i, (tokens, log_prob, ended, slid) in zip(rows, done, strict=True):
                text = self.tokenizer.decode(tokens)
                results.append(Generation(prompts[i], text, tokens, log_prob, ended, slid))
        return results

    def _batch(
        self,
        prompts: list[list[int]],
        cfg: DecodeConfig,
        max_new_tokens: int,
        on_text: OnText | None,
        names: list[int],
    ) -> list[tuple[list[int], float, bool, int]]:
        """One batch of prompts -> (tokens, log_prob, ended, slides) each. Prompts of different
        lengths are left-padded (the model hides the pads and counts each row's positions from
        its first token); past the context, the rows still going slide."""
        mc, device = self.config, device_of(self.model)
        n = len(prompts)
        out: list[list[int]] = [[] for _ in range(n)]
        log_prob, ended, slides = [0.0] * n, [False] * n, [0] * n
        half = max(self.context // 2, 1)
        context = [list(p) for p in prompts]  # what the next segment reads as its prompt
        for r, p in enumerate(prompts):
            if len(p) >= self.context:  # a prompt longer than the context: its end
                if cfg.strategy == "beam":
                    raise PromptError(f"the prompt passes the model's context of {self.context}")
                context[r], slides[r] = p[-half:], 1
        live = list(range(n))  # rows still generating; each has produced the same count
        segment = 0
        while live and not (cfg.strategy == "beam" and segment > 0):
            width = max(len(context[r]) for r in live)
            want = max_new_tokens - len(out[live[0]])
            seg_cfg = cfg.replace(
                max_len_a=0.0,
                max_len_b=min(want, self.context - width),
                at_max="stop",
                seed=cfg.seed + segment,
            )
            emit = None
            if on_text is not None and cfg.strategy != "beam":
                emit = self._emitter(live, out, on_text, names)
            pads = [width - len(context[r]) for r in live]
            prefix = torch.tensor(
                [[mc.pad_id] * k + context[r] for k, r in zip(pads, live, strict=True)],
                device=device,
            )
            offsets = torch.tensor(pads, device=device) if any(pads) else None
            hyps = decode(
                model_step(self.model),
                # the cache's room for the prompt and every new token: it never grows
                self.model.start(offsets, width + seg_cfg.max_len_b + 1),
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
