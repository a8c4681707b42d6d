"""Measure the explainers' claims on a trained translation model, on validation data.

- focus: softmax lets a head concentrate on one element -> per-head entropy and max weight;
- redundancy: several heads cover for one another -> BLEU and loss with each head masked, and
  a pruning curve (heads removed least important first);
- mitigation: skip connections and other layers absorb a broken part -> BLEU with one attention
  sublayer skipped, one whole layer removed, one skip connection removed;
- receptive field: stacking layers widens what a position sees -> source positions that
  measurably change each encoder layer's output at a position, by depth;
- search: beam vs greedy BLEU.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import plot
from .data import Example, Pair
from .evaluate import bleu
from .explain import attention_kind
from .inspect import ablate, attention_modules, head_stats, mask_heads, record_attention
from .masks import padding_mask
from .train import collate, loss_sum
from .translate import DecodeOptions, Translator

GREEDY = DecodeOptions(greedy=True, batch_size=100)


class Prober:
    def __init__(self, translator: Translator, pairs: Sequence[Pair], log: Callable[[str], None]):
        self.tr, self.pairs, self.log = translator, list(pairs), log
        self.model = translator.model
        srcs = translator.tok.encode_batch([s for s, _ in pairs])
        tgts = translator.tok.encode_batch([t for _, t in pairs])
        limit = translator.cfg.max_len - 2
        self.examples = [Example(s[:limit], t[:limit]) for s, t in zip(srcs, tgts, strict=True)]
        self.batches = [self.examples[i : i + 100] for i in range(0, len(self.examples), 100)]
        self.decodes = 0

    @torch.inference_mode()
    def loss(self) -> float:
        total, n = 0.0, 0
        for batch in self.batches:
            s, c = loss_sum(self.model, *collate(batch), 0.0)
            total, n = total + s.item(), n + c
        return total / n

    @torch.inference_mode()
    def bleu(self, opts: DecodeOptions = GREEDY) -> float:
        self.decodes += 1
        hyps = self.tr.translate_best([s for s, _ in self.pairs], opts)
        return bleu(hyps, [t for _, t in self.pairs])

    # -- focus -------------------------------------------------------------------------------
    @torch.inference_mode()
    def focus(self) -> dict[str, dict[str, list[list[float]]]]:
        sums: dict[str, list[torch.Tensor]] = {}
        for batch in self.batches:
            src, tgt_in, _ = collate(batch)
            with record_attention(self.model) as rec:
                self.model(src, tgt_in)
            for path, (w,) in rec.items():
                q = src if path.startswith("encoder") else tgt_in
                ent, top = head_stats(w, q != self.tr.cfg.pad_id)
                n = float((q != self.tr.cfg.pad_id).sum())
                acc = sums.setdefault(path, [torch.zeros_like(ent), torch.zeros_like(top), 0.0])
                acc[0] += ent * n
                acc[1] += top * n
                acc[2] += n
        out: dict[str, dict[str, list[list[float]]]] = {}
        for path in sorted(sums):
            ent, top, n = sums[path]
            kind = out.setdefault(attention_kind(path), {"entropy": [], "max_weight": []})
            kind["entropy"].append((ent / n).tolist())
            kind["max_weight"].append((top / n).tolist())
        return out

    # -- redundancy --------------------------------------------------------------------------
    def heads(self) -> list[tuple[str, int]]:
        return [
            (p, h)
            for p, m in sorted(attention_modules(self.model).items())
            for h in range(m.n_heads)
        ]

    def single_heads(self) -> list[dict[str, Any]]:
        rows = []
        for path, h in self.heads():
            with mask_heads(self.model, {path: [h]}):
                rows.append(
                    dict(
                        module=path,
                        kind=attention_kind(path),
                        head=h,
                        loss=self.loss(),
                        bleu=self.bleu(),
                    )
                )
            self.log(f"  head {path}[{h}] masked: BLEU {rows[-1]['bleu']:.2f}")
        return rows

    def pruning_curve(self, single: list[dict[str, Any]], fractions: Sequence[float]):
        order = sorted(single, key=lambda r: r["loss"])  # smallest loss increase first
        curve = []
        for f in fractions:
            k = round(f * len(order))
            groups: dict[str, list[int]] = {}
            for r in order[:k]:
                groups.setdefault(r["module"], []).append(r["head"])
            with mask_heads(self.model, groups):
                curve.append(dict(fraction=f, heads_removed=k, bleu=self.bleu(), loss=self.loss()))
            self.log(f"  {k} heads pruned: BLEU {curve[-1]['bleu']:.2f}")
        return curve

    # -- mitigation --------------------------------------------------------------------------
    def ablations(self) -> list[dict[str, Any]]:
        m = self.model
        rows = []
        parts = []
        for side in ("encoder", "decoder"):
            for i in range(len(getattr(m, side).layers)):
                layer = f"{side}.layers.{i}"
                parts.append(
                    ("skip attention sublayer", layer, dict(bypass=[f"{layer}.attn_residual"]))
                )
                if side == "decoder":
                    parts.append(
                        (
                            "skip cross-attention sublayer",
                            layer,
                            dict(bypass=[f"{layer}.cross_residual"]),
                        )
                    )
                parts.append(("remove layer", layer, dict(bypass=[layer])))
                for r in ("attn_residual", "cross_residual", "ff_residual"):
                    if side == "encoder" and r == "cross_residual":
                        continue
                    parts.append(
                        (
                            f"remove skip connection ({r.split('_')[0]})",
                            layer,
                            dict(no_skip=[f"{layer}.{r}"]),
                        )
                    )
        for what, layer, kw in parts:
            with ablate(m, **kw):
                rows.append(dict(ablation=what, layer=layer, bleu=self.bleu(), loss=self.loss()))
            self.log(f"  {what} in {layer}: BLEU {rows[-1]['bleu']:.2f}")
        return rows

    # -- receptive field ---------------------------------------------------------------------
    @torch.inference_mode()
    def receptive_field(self, n_sentences: int, thresholds: Sequence[float]):
        """Replace one source token at a time with <unk>; count, for each position and encoder
        depth, the source positions whose replacement changes that position's vector by more
        than `threshold` of its norm. Depth 0 is the embedding layer."""
        enc, unk = self.model.encoder, 3
        counts = {t: [] for t in thresholds}

        def states(src: torch.Tensor) -> list[torch.Tensor]:
            mask = padding_mask(src, self.tr.cfg.pad_id)
            x = enc.embed(src)
            out = [x]
            for layer in enc.layers:
                x = layer(x, mask)
                out.append(x)
            return out  # depth 0..L, each (B, S, D)

        per_depth = {t: [[] for _ in range(len(enc.layers) + 1)] for t in thresholds}
        for ex in self.examples[:n_sentences]:
            src = torch.tensor([ex.src + [self.tr.cfg.eos_id]])
            s = src.shape[1]
            variants = src.repeat(s, 1)
            variants[torch.arange(s), torch.arange(s)] = unk  # row j: token j replaced
            base, changed = states(src), states(variants)
            for depth, (b, c) in enumerate(zip(base, changed, strict=True)):
                delta = (c - b).norm(dim=-1)  # (S_j, S_i): change at i when j is replaced
                rel = delta / b[0].norm(dim=-1).clamp_min(1e-9)[None, :]
                for t in thresholds:
                    per_depth[t][depth].append((rel > t).float().sum(0).mean().item())
        for t in thresholds:
            counts[t] = [sum(v) / len(v) for v in per_depth[t]]
        return counts  # threshold -> per depth: mean number of source positions that matter


def run_probe(
    translator: Translator,
    pairs: Sequence[Pair],
    out_dir: str | Path,
    *,
    beam: int = 5,
    receptive_sentences: int = 50,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    p = Prober(translator, pairs, log)
    log(f"probing on {len(pairs)} validation sentences")
    report: dict[str, Any] = {"sentences": len(pairs)}
    base_bleu, base_loss = p.bleu(), p.loss()
    beam_bleu = p.bleu(DecodeOptions(beam=beam, batch_size=64))
    report["search"] = {"greedy_bleu": base_bleu, f"beam{beam}_bleu": beam_bleu, "loss": base_loss}
    log(f"greedy BLEU {base_bleu:.2f}, beam {beam} BLEU {beam_bleu:.2f}, loss {base_loss:.3f}")

    log("focus: attention entropy and max weight per head")
    focus = p.focus()
    report["focus"] = focus
    plot.layer_head_table(
        {k: torch.tensor(v["entropy"]) for k, v in focus.items()},
        "mean attention entropy (nats; 0 = one key gets all the weight)",
        out / "focus_entropy.png",
        cmap="viridis_r",
    )
    plot.layer_head_table(
        {k: torch.tensor(v["max_weight"]) for k, v in focus.items()},
        "mean max attention weight (1 = fully focused)",
        out / "focus_max_weight.png",
    )

    log("redundancy: masking one head at a time")
    single = p.single_heads()
    report["single_head"] = single
    drops: dict[str, list[list[float]]] = {}
    for r in single:
        layer = int(r["module"].split(".")[2])
        rows = drops.setdefault(r["kind"], [])
        while len(rows) <= layer:
            rows.append([])
        rows[layer].append(base_bleu - r["bleu"])
    plot.layer_head_table(
        {k: torch.tensor(v) for k, v in drops.items()},
        "BLEU lost when this one head is masked",
        out / "head_masking.png",
        cmap="Reds",
        fmt="{:.1f}",
    )
    fractions = [0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9]
    curve = p.pruning_curve(single, fractions)
    report["pruning"] = curve
    plot.lines(
        {"BLEU": ([c["fraction"] for c in curve], [c["bleu"] for c in curve])},
        "pruning heads, least important (by loss) first",
        "fraction of heads removed",
        "BLEU (greedy)",
        out / "pruning.png",
    )

    log("mitigation: skipping sublayers, removing layers and skip connections")
    abl = p.ablations()
    report["ablations"] = abl
    plot.bars(
        {f"{r['ablation']} · {r['layer']}": r["bleu"] for r in abl},
        "BLEU with one part taken out",
        "BLEU (greedy)",
        out / "ablations.png",
        reference=base_bleu,
    )

    log("receptive field: which source positions change each encoder depth")
    thresholds = [0.01, 0.1]
    rf = p.receptive_field(receptive_sentences, thresholds)
    report["receptive_field"] = {str(t): v for t, v in rf.items()}
    report["receptive_field_sentences"] = n_rf = min(receptive_sentences, len(pairs))
    report["mean_source_length"] = sum(len(e.src) + 1 for e in p.examples[:n_rf]) / n_rf
    plot.lines(
        {
            f"change > {int(t * 100)}% of the vector": (list(range(len(v))), v)
            for t, v in rf.items()
        },
        "receptive field by encoder depth (0 = embeddings)",
        "depth",
        "fraction of source positions that matter",
        out / "receptive_field.png",
    )

    report["minutes"] = (time.monotonic() - t0) / 60
    report["decodes"] = p.decodes
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report, beam))
    log(f"wrote {out / 'report.md'} ({report['minutes']:.1f} minutes, {p.decodes} decodes)")
    return report


def markdown(r: dict[str, Any], beam: int) -> str:
    s = r["search"]
    base = s["greedy_bleu"]
    single = sorted(r["single_head"], key=lambda x: x["bleu"])
    harmless = sum(1 for x in single if base - x["bleu"] < 0.5)
    worst = single[0]
    ent_lines = []
    for kind, v in r["focus"].items():
        flat = [e for row in v["entropy"] for e in row]
        mw = [m for row in v["max_weight"] for m in row]
        ent_lines.append(
            f"| {kind} | {min(flat):.2f} | {sum(flat) / len(flat):.2f} | "
            f"{max(flat):.2f} | {max(mw):.2f} | {sum(mw) / len(mw):.2f} |"
        )
    prune = "\n".join(
        f"| {c['fraction']:.2f} | {c['heads_removed']} | {c['bleu']:.2f} | {c['loss']:.3f} |"
        for c in r["pruning"]
    )
    abl = "\n".join(
        f"| {a['layer']} | {a['ablation']} | {a['bleu']:.2f} | {a['bleu'] - base:+.2f} |"
        for a in r["ablations"]
    )
    rf = r["receptive_field"]
    rf_rows = "\n".join(
        f"| {d} | " + " | ".join(f"{rf[t][d]:.2f}" for t in rf) + " |"
        for d in range(len(next(iter(rf.values()))))
    )
    return f"""# qkv probe

{r["sentences"]} validation sentences (a subsample, to finish in minutes on a CPU), greedy
decoding for every ablation; {r["decodes"]} decodes in {r["minutes"]:.1f} minutes.

## Search: does beam search beat greedy?
Greedy BLEU **{base:.2f}**, beam {beam} BLEU **{s[f"beam{beam}_bleu"]:.2f}** (loss {s["loss"]:.3f}).

## Focus: does softmax make heads focus?
Mean entropy of each head's attention rows (nats; 0 = all weight on one key) and mean max weight.

| kind | min entropy | mean entropy | max entropy | top head max weight | mean max weight |
|---|---:|---:|---:|---:|---:|
{chr(10).join(ent_lines)}

![entropy](focus_entropy.png) ![max weight](focus_max_weight.png)

## Redundancy: do heads cover for one another?
Masking one head at a time: {harmless} of {len(single)} heads cost less than 0.5 BLEU. The most
important head is {worst["module"]}[{worst["head"]}] ({worst["kind"]}): BLEU {worst["bleu"]:.2f}
({worst["bleu"] - base:+.2f}).

![head masking](head_masking.png)

Pruning heads cumulatively, least important (smallest loss increase alone) first:

| fraction | heads removed | BLEU | loss |
|---:|---:|---:|---:|
{prune}

![pruning](pruning.png)

## Mitigation: do skip connections and other layers absorb a broken part?
"skip attention sublayer": the sublayer's output is dropped and the skip connection carries its
input through; "remove layer": the whole layer is the identity; "remove skip connection": the
sublayer's output without its input added.

| layer | ablation | BLEU | change |
|---|---|---:|---:|
{abl}

![ablations](ablations.png)

## Receptive field: does depth widen what a position sees?
Replacing one source token at a time with `<unk>`: the mean number of source positions whose
replacement changes a position's vector by more than the threshold of its norm, by encoder depth
(0 = the embeddings, where only the position itself matters); {r["receptive_field_sentences"]}
sentences of {r["mean_source_length"]:.1f} subwords on average.

| depth | {" | ".join(f"> {float(t) * 100:g}%" for t in rf)} |
|---:|{"---:|" * len(rf)}
{rf_rows}

![receptive field](receptive_field.png)
"""
