"""Measure the explainers' claims on a trained translation model, on validation data.

- focus: softmax lets a head concentrate on one element -> per-head entropy and max weight;
- redundancy: several heads cover for one another -> BLEU and loss with each head masked, and
  a pruning curve (heads removed least important first);
- mitigation: skip connections and other layers absorb a broken part -> BLEU with one attention
  sublayer skipped, one whole layer removed, one skip connection removed;
- receptive field: stacking layers widens what a position sees -> source positions that
  measurably change each encoder layer's output at a position, by depth;
- search: beam vs greedy BLEU.

Everything here measures and returns a `ProbeReport`; probe_report.py turns it into pictures and
markdown. Special ids come from the model's config, so imported (Marian) models probe correctly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .config import DecodeConfig
from .data import Example, Pair, Seq2SeqBatch, collate
from .evaluate import bleu
from .inspect import (
    AttentionKind,
    ablate,
    attention_kind,
    attention_modules,
    head_stats,
    layer_index,
    mask_heads,
    module_order,
    record_attention,
    record_hidden,
)
from .loss import seq2seq_loss
from .models import device_of
from .translate import Translator

GREEDY = DecodeConfig(strategy="greedy")
STRONG = 0.3  # a weight at least this large: the key clearly matters to that head


@dataclass
class MaskedHead:
    module: str
    kind: AttentionKind
    head: int
    loss: float
    bleu: float


@dataclass
class PruningPoint:
    fraction: float
    heads_removed: int
    bleu: float
    loss: float


@dataclass
class Ablation:
    ablation: str  # what was taken out
    layer: str
    bleu: float
    loss: float


@dataclass
class ProbeReport:
    sentences: int
    greedy_bleu: float
    beam: int
    beam_bleu: float
    loss: float
    # kind -> "entropy" / "max_weight" -> per layer, per head
    focus: dict[AttentionKind, dict[str, list[list[float]]]] = field(default_factory=dict)
    # kind -> "distinct_top" / "strong" (per layer), "distinct_top_all": see Prober.diversity
    diversity: dict[AttentionKind, dict[str, Any]] = field(default_factory=dict)
    single_head: list[MaskedHead] = field(default_factory=list)
    pruning: list[PruningPoint] = field(default_factory=list)
    ablations: list[Ablation] = field(default_factory=list)
    # threshold -> per encoder depth (0 = embeddings): mean number of source positions that matter
    receptive_field: dict[float, list[float]] = field(default_factory=dict)
    receptive_field_sentences: int = 0
    mean_source_length: float = 0.0
    minutes: float = 0.0
    decodes: int = 0

    def harmless_heads(self, max_drop: float = 0.5) -> int:
        """Heads that cost less than `max_drop` BLEU when masked alone."""
        return sum(1 for h in self.single_head if self.greedy_bleu - h.bleu < max_drop)

    def most_important_head(self) -> MaskedHead:
        return min(self.single_head, key=lambda h: h.bleu)

    def bleu_drop_by_layer(self) -> dict[AttentionKind, list[list[float]]]:
        """kind -> per layer, per head: BLEU lost when that head alone is masked."""
        out: dict[AttentionKind, list[list[float]]] = {}
        for h in self.single_head:
            rows = out.setdefault(h.kind, [])
            layer = layer_index(h.module)
            while len(rows) <= layer:
                rows.append([])
            rows[layer].append(self.greedy_bleu - h.bleu)
        return out

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["focus"] = {str(k): v for k, v in self.focus.items()}
        data["diversity"] = {str(k): v for k, v in self.diversity.items()}
        data["receptive_field"] = {str(t): v for t, v in self.receptive_field.items()}
        for h in data["single_head"]:
            h["kind"] = str(h["kind"])
        return data


def real_queries(batch: Seq2SeqBatch, encoder: bool, pad: int) -> torch.Tensor:
    """True on the queries that count: real source tokens (encoder self-attention), target
    positions with a target (decoder self- and cross-attention)."""
    return batch.src != pad if encoder else batch.tgt_out != pad


class Prober:
    def __init__(
        self,
        translator: Translator,
        pairs: Sequence[Pair],
        log: Callable[[str], None],
        target_lang: str | None = None,  # BLEU's tokenizer follows it (Chinese: "zh")
    ):
        self.translator, self.pairs, self.log = translator, list(pairs), log
        self.target_lang = target_lang
        self.model, self.config = translator.model, translator.config
        tok = translator.tokenizer
        srcs = tok.encode_batch([s for s, _ in pairs])
        tgts = tok.encode_target_batch([t for _, t in pairs])
        limit = self.config.max_len - 2
        self.examples = [Example(s[:limit], t[:limit]) for s, t in zip(srcs, tgts, strict=True)]
        c, device = self.config, device_of(self.model)
        # collated once: every loss pass (one per masked head and ablation) reuses them
        self.batches: list[Seq2SeqBatch] = [
            collate(self.examples[i : i + 100], c.pad_id, c.bos_id, c.eos_id).to(device)
            for i in range(0, len(self.examples), 100)
        ]
        self.decodes = 0

    @torch.inference_mode()
    def loss(self) -> float:
        """Cross-entropy per reference token."""
        total, n = 0.0, 0
        for batch in self.batches:
            total, n = total + seq2seq_loss(self.model, batch, 0.0).item(), n + batch.tokens
        return total / n

    def bleu(self, cfg: DecodeConfig = GREEDY) -> float:
        self.decodes += 1
        hyps = self.translator.translate_best([s for s, _ in self.pairs], cfg)
        return bleu(hyps, [t for _, t in self.pairs], self.target_lang)

    # -- focus -------------------------------------------------------------------------------
    @torch.inference_mode()
    def focus(self) -> dict[AttentionKind, dict[str, list[list[float]]]]:
        pad = self.config.pad_id
        sums: dict[str, list[Any]] = {}
        for batch in self.batches:
            with record_attention(self.model) as rec:
                self.model(batch.src, batch.tgt_in)
            for path, (w,) in rec.items():
                real = real_queries(batch, path.startswith("encoder"), pad)
                ent, top = head_stats(w, real)
                n = float(real.sum())
                acc = sums.setdefault(path, [torch.zeros_like(ent), torch.zeros_like(top), 0.0])
                acc[0] += ent * n
                acc[1] += top * n
                acc[2] += n
        out: dict[AttentionKind, dict[str, list[list[float]]]] = {}
        for path in sorted(sums):
            ent, top, n = sums[path]
            kind = out.setdefault(attention_kind(path), {"entropy": [], "max_weight": []})
            kind["entropy"].append((ent / n).tolist())
            kind["max_weight"].append((top / n).tolist())
        return out

    # -- diversity ---------------------------------------------------------------------------
    @torch.inference_mode()
    def diversity(self, strong: float = STRONG) -> dict[AttentionKind, dict[str, Any]]:
        """Do a layer's heads look at different words? For each real query: the number of
        distinct keys that are some head's top weight ("distinct_top", per layer: 1 to H), the
        number of keys that some head gives at least `strong` ("strong", per layer), and the
        distinct top keys of all layers' heads together ("distinct_top_all"); means over
        queries. A single-head model picks one key per layer: the explainers' claim is that
        several heads let one word attend to several others at once ("crossed": its subject,
        its object, its adverb)."""
        pad = self.config.pad_id
        sums: dict[str, list[Any]] = {}
        union: dict[AttentionKind, list[Any]] = {}
        for batch in self.batches:
            with record_attention(self.model) as rec:
                self.model(batch.src, batch.tgt_in)
            picked_by_kind: dict[AttentionKind, Any] = {}
            for path, (w,) in sorted(rec.items()):  # w (B, H, T, S)
                real = real_queries(batch, path.startswith("encoder"), pad)
                top = w.argmax(-1).transpose(1, 2)  # (B, T, H): each head's top key
                picked = torch.zeros_like(w[:, 0]).scatter_(2, top, 1.0)  # (B, T, S)
                distinct = picked.sum(-1)[real].sum().item()
                many = (w.amax(1) >= strong).sum(-1)[real].sum().item()
                acc = sums.setdefault(path, [0.0, 0.0, 0.0])
                acc[0], acc[1], acc[2] = acc[0] + distinct, acc[1] + many, acc[2] + real.sum()
                kind = attention_kind(path)
                before = picked_by_kind.get(kind)
                picked_by_kind[kind] = picked if before is None else before.maximum(picked)
            for kind, picked in picked_by_kind.items():
                real = real_queries(batch, kind is AttentionKind.ENCODER_SELF, pad)
                acc = union.setdefault(kind, [0.0, 0.0])
                acc[0] += picked.sum(-1)[real].sum().item()
                acc[1] += float(real.sum())
        out: dict[AttentionKind, dict[str, Any]] = {}
        for path in sorted(sums, key=module_order):
            distinct, many, n = sums[path]
            kind = out.setdefault(attention_kind(path), {"distinct_top": [], "strong": []})
            kind["distinct_top"].append(distinct / float(n))
            kind["strong"].append(many / float(n))
        for kind, (total, n) in union.items():
            out[kind]["distinct_top_all"] = total / n
        return out

    # -- redundancy --------------------------------------------------------------------------
    def heads(self) -> list[tuple[str, int]]:
        return [
            (p, h)
            for p, m in sorted(attention_modules(self.model).items())
            for h in range(m.n_heads)
        ]

    def single_heads(self) -> list[MaskedHead]:
        rows = []
        for path, h in self.heads():
            with mask_heads(self.model, {path: [h]}):
                rows.append(MaskedHead(path, attention_kind(path), h, self.loss(), self.bleu()))
            self.log(f"  head {path}[{h}] masked: BLEU {rows[-1].bleu:.2f}")
        return rows

    def pruning_curve(
        self, single: list[MaskedHead], fractions: Sequence[float]
    ) -> list[PruningPoint]:
        order = sorted(single, key=lambda r: r.loss)  # smallest loss increase first
        curve = []
        for f in fractions:
            k = round(f * len(order))
            groups: dict[str, list[int]] = {}
            for r in order[:k]:
                groups.setdefault(r.module, []).append(r.head)
            with mask_heads(self.model, groups):
                curve.append(PruningPoint(f, k, self.bleu(), self.loss()))
            self.log(f"  {k} heads pruned: BLEU {curve[-1].bleu:.2f}")
        return curve

    # -- mitigation --------------------------------------------------------------------------
    def ablations(self) -> list[Ablation]:
        parts = []
        for side in ("encoder", "decoder"):
            for i in range(len(getattr(self.model, side).layers)):
                layer = f"{side}.layers.{i}"
                parts.append(
                    ("skip attention sublayer", layer, {"bypass": [f"{layer}.attn_residual"]})
                )
                if side == "decoder":
                    parts.append(
                        (
                            "skip cross-attention sublayer",
                            layer,
                            {"bypass": [f"{layer}.cross_residual"]},
                        )
                    )
                parts.append(("remove layer", layer, {"bypass": [layer]}))
                for r in ("attn_residual", "cross_residual", "ff_residual"):
                    if side == "decoder" or r != "cross_residual":
                        what = f"remove skip connection ({r.split('_')[0]})"
                        parts.append((what, layer, {"no_skip": [f"{layer}.{r}"]}))
        rows = []
        for what, layer, kw in parts:
            with ablate(self.model, **kw):
                rows.append(Ablation(what, layer, self.bleu(), self.loss()))
            self.log(f"  {what} in {layer}: BLEU {rows[-1].bleu:.2f}")
        return rows

    # -- receptive field ---------------------------------------------------------------------
    @torch.inference_mode()
    def receptive_field(
        self, n_sentences: int, thresholds: Sequence[float]
    ) -> dict[float, list[float]]:
        """Replace one source token at a time with the unknown token; count, for each position
        and encoder depth, the source positions whose replacement changes that position's vector
        by more than `threshold` of its norm. Depth 0 is the embedding layer."""
        enc, unk, device = (
            self.model.encoder,
            self.translator.tokenizer.unk_id,
            device_of(self.model),
        )
        sources = [
            torch.tensor(ex.src + [self.config.eos_id], device=device)
            for ex in self.examples[:n_sentences]
        ]
        return positions_that_matter(
            [enc.embed, *enc.layers],
            self.model.encode,
            sources,
            lambda ids: torch.full_like(ids, unk),
            thresholds,
        )


@torch.inference_mode()
def positions_that_matter(
    stack: Sequence[torch.nn.Module],
    forward: Callable[[torch.Tensor], Any],
    sequences: Iterable[torch.Tensor],
    substitute: Callable[[torch.Tensor], torch.Tensor],
    thresholds: Sequence[float],
) -> dict[float, list[float]]:
    """The receptive field by depth. Each sequence (S,) of token ids is run once as it is and
    once with each token replaced by its `substitute` (variant j: token j replaced); for each
    position and each module of `stack` (depth 0: the embeddings), count the replacements that
    change that position's output by more than `threshold` of its norm. Mean over positions,
    then over sequences."""
    per: dict[float, list[list[float]]] = {t: [[] for _ in stack] for t in thresholds}
    for ids in sequences:
        s = len(ids)
        variants = ids.repeat(s, 1)
        diagonal = torch.arange(s, device=ids.device)
        variants[diagonal, diagonal] = substitute(ids)  # row j: token j replaced
        with record_hidden(stack) as rec:
            forward(ids[None])
            forward(variants)
        for depth, (b, c) in enumerate(rec):  # b (1, S, D), c (S_j, S_i, D)
            delta = (c - b).norm(dim=-1)  # change at i when j is replaced
            rel = delta / b[0].norm(dim=-1).clamp_min(1e-9)[None, :]
            for t in thresholds:
                per[t][depth].append((rel > t).float().sum(0).mean().item())
    return {t: [sum(v) / len(v) for v in per[t]] for t in thresholds}


def probe(
    translator: Translator,
    pairs: Sequence[Pair],
    *,
    beam: int = 5,
    receptive_sentences: int = 50,
    log: Callable[[str], None] = print,
    target_lang: str | None = None,
) -> ProbeReport:
    """Run every measurement on `pairs` (source, reference)."""
    t0 = time.monotonic()
    p = Prober(translator, pairs, log, target_lang)
    log(f"probing on {len(pairs)} validation sentences")
    greedy_bleu, loss = p.bleu(), p.loss()
    beam_bleu = p.bleu(DecodeConfig(strategy="beam", beam=beam))
    r = ProbeReport(len(pairs), greedy_bleu, beam, beam_bleu, loss)
    log(f"greedy BLEU {greedy_bleu:.2f}, beam {beam} BLEU {beam_bleu:.2f}, loss {loss:.3f}")
    log("focus: attention entropy and max weight per head")
    r.focus = p.focus()
    log("diversity: how many different words a query's heads pick out")
    r.diversity = p.diversity()
    log("redundancy: masking one head at a time")
    r.single_head = p.single_heads()
    r.pruning = p.pruning_curve(r.single_head, [0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9])
    log("mitigation: skipping sublayers, removing layers and skip connections")
    r.ablations = p.ablations()
    log("receptive field: which source positions change each encoder depth")
    r.receptive_field = p.receptive_field(receptive_sentences, [0.01, 0.1])
    r.receptive_field_sentences = n = min(receptive_sentences, len(p.examples))
    r.mean_source_length = sum(len(e.src) + 1 for e in p.examples[:n]) / n
    r.minutes, r.decodes = (time.monotonic() - t0) / 60, p.decodes
    return r
