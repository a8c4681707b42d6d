"""Attention during a real translation or generation: every layer's and head's weights (encoder
self, decoder self, cross) for the output the model actually produced.

Greedy and sampled outputs are recorded step by step while they are generated. For beam search
the weights along the chosen hypothesis are those of one teacher-forced pass over it:
incremental decoding equals the full forward (tests/test_models.py), so these are the weights the
search computed for that hypothesis, without following it through every beam reorder. A
language model's output is likewise read once more, prompt and continuation together, in one
causal forward pass: the same weights, since future tokens change nothing before them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import plot
from .checkpoint import write_text_atomic
from .config import DecodeConfig
from .generate import Generator
from .html import attention_page
from .inspect import AttentionKind, attention_kind, module_order, record_attention
from .models import device_of
from .search import decode, model_step
from .sentences import encode_tokens
from .translate import Translator

# The tokens along each kind's (query, key) axes, as Explanation field names.
AXES = {
    AttentionKind.ENCODER_SELF: ("src_tokens", "src_tokens"),
    AttentionKind.DECODER_SELF: ("tgt_in", "tgt_in"),
    AttentionKind.CROSS: ("tgt_in", "src_tokens"),
}


@dataclass
class Explanation:
    source: str  # the sentence, or the prompt
    translation: str  # the output: a translation, or the prompt's continuation
    src_tokens: list[str]  # subwords of the source, with </s> (none for a language model)
    tgt_in: list[str]  # decoder inputs: <s> + output subwords (prompt + continuation)
    tgt_out: list[str]  # what each decoder position predicted: output subwords + </s>
    attention: dict[AttentionKind, list[Tensor]]  # per layer (H, T, S)
    mode: str  # how the output was chosen: "greedy", "sample (seed 0)", "beam 5"
    # encoders: each source token's share of the output score (class logit or cosine)
    contributions: list[float] | None = None
    contribution_of: str = ""  # what the contributions add up to
    contribution_title: str = ""  # the bars' title, when "each token's share of ..." is not it

    def alignment(self) -> Tensor:
        """Cross-attention averaged over all layers and heads: (T, S), a soft word alignment."""
        return torch.stack(self.attention[AttentionKind.CROSS]).mean(dim=(0, 1))

    @property
    def has_cross(self) -> bool:
        return bool(self.attention.get(AttentionKind.CROSS))

    def to_json(self) -> dict[str, Any]:
        default = AttentionKind.CROSS if self.has_cross else AttentionKind.DECODER_SELF
        return {
            "source": self.source,
            "translation": self.translation,
            "mode": self.mode,
            "src_tokens": self.src_tokens,
            "tgt_in": self.tgt_in,
            "tgt_out": self.tgt_out,
            "axes": {str(kind): list(AXES[kind]) for kind in self.attention},
            "default_kind": str(default),
            "contributions": self.contributions,
            "contribution_of": self.contribution_of,
            "attention": {
                str(kind): [
                    [[[round(float(x), 5) for x in row] for row in head] for head in layer.tolist()]
                    for layer in layers
                ]
                for kind, layers in self.attention.items()
            },
        }


def _sentence_ids(model, tok, text: str) -> list[int]:
    """A sentence's ids as the encoder reads them: cut to its positions, ending in eos."""
    return tok.encode_batch([text])[0][: model.config.max_len - 1] + [model.config.eos_id]


@torch.inference_mode()
def _encode_recorded(model, ids: list[int]) -> tuple[Tensor, Tensor, Tensor, dict]:
    """Per-token vectors (S, D), the pooled vector (D,), the tokens' pooling weights (S,) and
    the encoder's self-attention."""
    x = torch.tensor([ids], device=device_of(model))
    with record_attention(model) as rec:
        tokens, pooled, weights = encode_tokens(model, x)
    attention = _by_kind({path: steps[0][0] for path, steps in rec.items()})
    weights = torch.ones_like(x) if weights is None else weights
    return tokens[0].float(), pooled[0].float(), weights[0].float(), attention


def _shares(model, tokens: Tensor, weights: Tensor, direction: Tensor) -> list[float]:
    """Each token's exact share of pooled . direction: with mean pooling the pooled vector is
    the (weighted) mean of the token vectors, so the score splits into one term per token; with max
    pooling each dimension is one token's; with first-token pooling all is the first token's."""
    how = model.config.pooling
    if how == "first":
        return [float(tokens[0] @ direction)] + [0.0] * (len(tokens) - 1)
    if how == "max":  # each dimension comes from one token: credit that token with it
        winner = tokens.argmax(0)  # (D,)
        terms = tokens.max(0).values * direction
        return [float(terms[winner == i].sum()) for i in range(len(tokens))]
    if how == "weighted":
        return [
            float(w * (t @ direction) / weights.sum()) for t, w in zip(tokens, weights, strict=True)
        ]
    return [float(t @ direction) / len(tokens) for t in tokens]


@torch.inference_mode()
def explain_classification(model, tok, sentence: str, labels: list[str]) -> Explanation:
    """Classify one sentence; capture the encoder's self-attention (every layer and head) and
    how much each token adds to the chosen class's logit (the pooled embedding is the mean of
    the token vectors and the head is linear, so the logit splits exactly into one term per
    token, plus the bias)."""
    ids = _sentence_ids(model, tok, sentence)
    tokens, pooled, weights, attention = _encode_recorded(model, ids)
    head = model.classifier
    probs = head(pooled).float().softmax(-1)
    best = int(probs.argmax())
    shares = _shares(model, tokens, weights, head.weight[best].float())
    return Explanation(
        source=sentence,
        translation=f"{labels[best]} ({float(probs[best]):.3f})",
        src_tokens=[tok.id_to_token(i) for i in ids],
        tgt_in=[],
        tgt_out=[],
        attention=attention,
        mode="classify",
        contributions=shares,
        contribution_of=f"the {labels[best]!r} logit (minus the bias {float(head.bias[best]):.2f})",
    )


@torch.inference_mode()
def explain_similarity(model, tok, a: str, b: str) -> tuple[Explanation, Explanation, float]:
    """A bi-encoder's view of a pair: each sentence's self-attention, and how much each of its
    tokens adds to the cosine (cos = mean of token vectors . the other's unit vector / own
    length: one term per token); the cosine last."""
    sides = []
    for text in (a, b):
        ids = _sentence_ids(model, tok, text)
        sides.append((text, ids, *_encode_recorded(model, ids)))
    cos = float(torch.nn.functional.cosine_similarity(sides[0][3], sides[1][3], dim=0))
    out = []
    for (text, ids, tokens, pooled, weights, attention), other in zip(
        sides, sides[::-1], strict=True
    ):
        direction = other[3] / other[3].norm() / pooled.norm()
        out.append(
            Explanation(
                source=text,
                translation=f"cosine {cos:.3f} with: {other[0]}",
                src_tokens=[tok.id_to_token(i) for i in ids],
                tgt_in=[],
                tgt_out=[],
                attention=attention,
                mode="similarity",
                contributions=_shares(model, tokens, weights, direction),
                contribution_of="the cosine similarity with the other sentence",
            )
        )
    return out[0], out[1], cos


def _by_kind(recorded: dict[str, Tensor]) -> dict[AttentionKind, list[Tensor]]:
    out: dict[AttentionKind, list[Tensor]] = {kind: [] for kind in AttentionKind}
    for path in sorted(recorded, key=module_order):  # by layer number within each kind
        out[attention_kind(path)].append(recorded[path])
    return {kind: layers for kind, layers in out.items() if layers}


@torch.inference_mode()
def explain(
    translator: Translator, sentence: str, cfg: DecodeConfig, output: list[int] | None = None
) -> Explanation:
    """Translate one sentence as `cfg` says and capture all attention along the output. Beam
    search: `output`, the best output's tokens when the caller has searched already (for its
    tree), is not searched again."""
    model, tok, mc = translator.model, translator.tokenizer, translator.config
    src_ids = translator.encode_sources([sentence])[0]
    src = torch.tensor([src_ids], device=device_of(model))
    if cfg.strategy == "beam":
        if output is None:
            (nbest,) = translator.translate_ids([src_ids], cfg.replace(nbest=1))
            output = nbest[0].tokens
        out_ids = output
        tgt = torch.tensor([[mc.bos_id] + out_ids], device=src.device)
        with record_attention(model) as rec:
            model(src, tgt)
        recorded = {path: steps[0][0] for path, steps in rec.items()}
    else:  # one row: record while generating
        with record_attention(model) as rec:
            ((hyp,),) = decode(
                model_step(model),
                model.start(src),
                torch.tensor([len(src_ids)], device=src.device),
                cfg,
                bos=mc.bos_id,
                eos=mc.eos_id,
                pad=mc.pad_id,
                max_positions=mc.max_len,
            )
        out_ids = hyp.tokens
        recorded = _stitch_steps(rec, len(out_ids) + 1)
    pieces = [tok.id_to_token(i) for i in out_ids]
    return Explanation(
        source=sentence,
        translation=tok.decode(out_ids),
        src_tokens=[tok.id_to_token(i) for i in src_ids],
        tgt_in=["<s>"] + pieces,
        tgt_out=pieces + ["</s>"],
        attention=_by_kind(recorded),
        mode=cfg.describe(),
    )


@torch.inference_mode()
def explain_generation(
    generator: Generator, prompt: str, cfg: DecodeConfig, max_new_tokens: int
) -> Explanation:
    """Continue `prompt` with a language model and capture its causal self-attention, every
    layer and head, over the prompt and the continuation (as far as the context reaches)."""
    model, tok = generator.model, generator.tokenizer
    (g,) = generator.generate([prompt], cfg, max_new_tokens)
    ids = (generator.encode(prompt) + g.tokens)[: generator.context]
    with record_attention(model) as rec:
        model(torch.tensor([ids], device=device_of(model)))
    # each token as text, whitespace made visible
    pieces = [tok.decode([i]).replace("\n", "⏎").replace(" ", "␣") or "·" for i in ids]
    return Explanation(
        source=prompt,
        translation=g.text,
        src_tokens=[],
        tgt_in=pieces,
        tgt_out=pieces[1:] + ["…"],
        attention=_by_kind({path: steps[0][0] for path, steps in rec.items()}),
        mode=cfg.describe(),
    )


def _stitch_steps(rec: dict[str, list[Tensor]], t: int) -> dict[str, Tensor]:
    """One (H, T, S) map per module from the per-step weights of a one-row generation."""
    recorded = {}
    for path, steps in rec.items():
        if attention_kind(path) is AttentionKind.ENCODER_SELF:
            recorded[path] = steps[0][0]  # (H, S, S)
        elif attention_kind(path) is AttentionKind.CROSS:
            recorded[path] = torch.cat([w[0] for w in steps], dim=1)[:, :t]  # (H, T, S)
        else:  # self-attention rows grow by one key per step: pad into a triangle
            full = steps[0].new_zeros(steps[0].shape[1], t, t)
            for i, w in enumerate(steps[:t]):
                full[:, i, : i + 1] = w[0, :, 0]
            recorded[path] = full
    return recorded


def write_artifacts(
    e: Explanation, out: Path, with_json: bool = False, query: str | None = None
) -> list[Path]:
    """The pictures (one layers x heads grid per kind, the alignment, and with `query` that
    word's attention in every head), the offline HTML explorer and optionally the raw weights
    as JSON; returns the paths written. QueryError before anything is written."""
    picked = query_attention(e, query) if query else None
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if picked is not None and query is not None:
        i, kind, layers = picked
        keys = e.src_tokens if e.src_tokens else e.tgt_in
        name = "".join(c if c.isalnum() else "_" for c in query.strip()) or "token"
        written.append(
            plot.query_heads(layers, keys, keys[i], f"{kind} attention", out / f"query-{name}.png")
        )
    for kind, layers in e.attention.items():
        q, k = AXES[kind]
        title = f"{kind} attention"
        path = out / f"{kind.value.replace(' ', '_')}.png"
        written.append(plot.attention_grid(layers, getattr(e, k), getattr(e, q), title, path))
    if e.contributions is not None:
        shares = {
            f"{i}:{t}": c
            for i, (t, c) in enumerate(zip(e.src_tokens, e.contributions, strict=True))
        }
        title = e.contribution_title or f"each token's share of {e.contribution_of}"
        written.append(plot.bars(shares, title, "share", out / "contributions.png"))
    if e.has_cross:
        written.append(
            plot.alignment(
                e.alignment(),
                e.src_tokens,
                e.tgt_out,
                "cross-attention alignment (mean of all layers and heads)",
                out / "alignment.png",
            )
        )
    data = e.to_json()
    write_text_atomic(out / "attention.html", attention_page(data))
    written.append(out / "attention.html")
    if with_json:
        write_text_atomic(out / "attention.json", json.dumps(data))
        written.append(out / "attention.json")
    return written


WORD_START = "▁Ġ␣"  # how tokenizers mark a token that begins a word (sentencepiece, GPT-2, ours)


def _word_start(tokens: list[str], word: str) -> int | None:
    """The first token of the first word spelled `word` (case aside): a token that is the word,
    or the first real token of the subwords that spell it ("▁cross" "ed" for "crossed")."""
    want = word.strip().lower()
    words: list[tuple[int, str]] = []  # (first token with text, the word so far)
    for i, t in enumerate(tokens):
        text = t.lstrip(WORD_START).lower()
        if t[:1] in WORD_START or not words:
            words.append((i if text else -1, text))
        else:
            first, so_far = words[-1]
            words[-1] = (first if first >= 0 else i, so_far + text)
    whole = next((first for first, w in words if w == want and first >= 0), None)
    if whole is not None:
        return whole
    return next((i for i, t in enumerate(tokens) if t.lstrip(WORD_START).lower() == want), None)


class QueryError(ValueError):
    """The --query word is not among the explained tokens; the message lists them."""


def query_attention(e: Explanation, word: str) -> tuple[int, AttentionKind, list[Tensor]]:
    """The first token spelling `word` (or starting it, for a word cut into subwords) in the
    explained input, and every layer's per-head weights from it: (position, kind, per layer
    (H, S)). Encoder self-attention where there is an encoder, else the decoder's."""
    kind = AttentionKind.ENCODER_SELF if e.src_tokens else AttentionKind.DECODER_SELF
    if kind not in e.attention:
        raise QueryError("this model has no self-attention to show for a query")
    tokens = e.src_tokens if e.src_tokens else e.tgt_in
    i = _word_start(tokens, word)
    if i is None:
        raise QueryError(f"no token {word!r} in the input (its tokens: {' '.join(tokens)})")
    return i, kind, [layer[:, i] for layer in e.attention[kind]]


@torch.inference_mode()
def explain_recommendation(
    model, items, history: list[int], block_size: int, exclude_seen: bool = True
) -> Explanation:
    """Why a next-item model recommends what it does: its causal self-attention over the
    history (every layer and head; each position's row is what it read to predict the item
    after it), and for each past item how much the top recommendation's score drops when that
    item is left out of the history (one forward pass per left-out item, all in one batch)."""
    from .recommend import next_item_scores, recommend

    history = history[-block_size:]
    (best, *_), *_ = recommend(model, items, [history], block_size, 1, exclude_seen)
    ids = items.encode(history)
    with record_attention(model) as rec:
        logits = model(torch.tensor([ids], device=device_of(model)))[0]
    left_out = [ids[:i] + ids[i + 1 :] for i in range(len(ids))]
    drops = [0.0] * len(ids)
    if len(ids) > 1:
        scores = next_item_scores(model, left_out, block_size)[:, items.index[best.item]]
        drops = [best.score - float(s) for s in scores]
    tokens = [str(i) for i in history]
    predicted = logits[:, items.first :].argmax(-1) + items.first
    return Explanation(
        source=" ".join(tokens),
        translation=f"{best.item} (score {best.score:.3f})",
        src_tokens=tokens,
        tgt_in=tokens,
        tgt_out=[items.id_to_token(int(i)) for i in predicted],
        attention=_by_kind({path: steps[0][0] for path, steps in rec.items()}),
        mode="next item",
        contributions=drops,
        contribution_of=f"item {best.item}'s score",
        contribution_title=(
            f"how much item {best.item}'s score drops when each past item is left out "
            "(below 0: it rises)"
        ),
    )
