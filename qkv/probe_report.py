"""The probe's report: a ProbeReport as PNG charts, report.md and report.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import plot
from .checkpoint import write_text_atomic
from .probe import ProbeReport


def write_report(r: ProbeReport, out_dir: str | Path) -> Path:
    """Write the charts, report.json and report.md into out_dir; returns report.md's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot.layer_head_table(
        {str(k): torch.tensor(v["entropy"]) for k, v in r.focus.items()},
        "mean attention entropy (nats; 0 = one key gets all the weight)",
        out / "focus_entropy.png",
        cmap="viridis_r",
    )
    plot.layer_head_table(
        {str(k): torch.tensor(v["max_weight"]) for k, v in r.focus.items()},
        "mean max attention weight (1 = fully focused)",
        out / "focus_max_weight.png",
    )
    plot.layer_head_table(
        {str(k): torch.tensor(v) for k, v in r.bleu_drop_by_layer().items()},
        "BLEU lost when this one head is masked",
        out / "head_masking.png",
        cmap="Reds",
        fmt="{:.1f}",
    )
    plot.lines(
        {"BLEU": ([c.fraction for c in r.pruning], [c.bleu for c in r.pruning])},
        "pruning heads, least important (by loss) first",
        "fraction of heads removed",
        "BLEU (greedy)",
        out / "pruning.png",
    )
    plot.bars(
        {f"{a.ablation} · {a.layer}": a.bleu for a in r.ablations},
        "BLEU with one part taken out",
        "BLEU (greedy)",
        out / "ablations.png",
        reference=r.greedy_bleu,
    )
    plot.lines(
        {
            f"change > {t * 100:g}% of the vector": (list(range(len(v))), v)
            for t, v in r.receptive_field.items()
        },
        "receptive field by encoder depth (0 = embeddings)",
        "depth",
        "mean number of source positions that matter",
        out / "receptive_field.png",
    )
    write_text_atomic(out / "report.json", json.dumps(r.to_json(), indent=2))
    write_text_atomic(out / "report.md", markdown(r))
    return out / "report.md"


def markdown(r: ProbeReport) -> str:
    base = r.greedy_bleu
    worst = r.most_important_head()
    ent_lines = []
    for kind, v in r.focus.items():
        flat = [e for row in v["entropy"] for e in row]
        mw = [m for row in v["max_weight"] for m in row]
        ent_lines.append(
            f"| {kind} | {min(flat):.2f} | {sum(flat) / len(flat):.2f} | "
            f"{max(flat):.2f} | {max(mw):.2f} | {sum(mw) / len(mw):.2f} |"
        )
    div_lines = [
        f"| {kind} | {' / '.join(f'{x:.2f}' for x in v['distinct_top'])} | "
        f"{' / '.join(f'{x:.2f}' for x in v['strong'])} | {v['distinct_top_all']:.2f} |"
        for kind, v in r.diversity.items()
    ]
    prune = "\n".join(
        f"| {c.fraction:.2f} | {c.heads_removed} | {c.bleu:.2f} | {c.loss:.3f} |" for c in r.pruning
    )
    abl = "\n".join(
        f"| {a.layer} | {a.ablation} | {a.bleu:.2f} | {a.bleu - base:+.2f} |" for a in r.ablations
    )
    rf = r.receptive_field
    depths = len(next(iter(rf.values())))
    rf_rows = "\n".join(
        f"| {d} | " + " | ".join(f"{rf[t][d]:.2f}" for t in rf) + " |" for d in range(depths)
    )
    return f"""# qkv probe

{r.sentences} validation sentences (a subsample, to finish in minutes on a CPU), greedy
decoding for every ablation; {r.decodes} decodes in {r.minutes:.1f} minutes.

## Search: does beam search beat greedy?
Greedy BLEU **{base:.2f}**, beam {r.beam} BLEU **{r.beam_bleu:.2f}** (loss {r.loss:.3f}).

## Focus: does softmax make heads focus?
Mean entropy of each head's attention rows (nats; 0 = all weight on one key) and mean max weight.

| kind | min entropy | mean entropy | max entropy | top head max weight | mean max weight |
|---|---:|---:|---:|---:|---:|
{chr(10).join(ent_lines)}

![entropy](focus_entropy.png) ![max weight](focus_max_weight.png)

## Diversity: do a word's heads look at different words?
For each query, the distinct keys that are some head's top weight in a layer (at most the number
of heads), the keys some head gives at least 0.3, and the distinct top keys of all layers'
heads together; means over queries, layers separated by /.

| kind | distinct top keys per layer | keys given >= 0.3 per layer | distinct top keys, all layers |
|---|---|---|---:|
{chr(10).join(div_lines)}

## Redundancy: do heads cover for one another?
Masking one head at a time: {r.harmless_heads()} of {len(r.single_head)} heads cost less than 0.5
BLEU. The most important head is {worst.module}[{worst.head}] ({worst.kind}): BLEU {worst.bleu:.2f}
({worst.bleu - base:+.2f}).

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
Replacing one source token at a time with the unknown token: the mean number of source positions
whose replacement changes a position's vector by more than the threshold of its norm, by encoder
depth (0 = the embeddings, where only the position itself matters); {r.receptive_field_sentences}
sentences of {r.mean_source_length:.1f} subwords on average.

| depth | {" | ".join(f"> {t * 100:g}%" for t in rf)} |
|---:|{"---:|" * len(rf)}
{rf_rows}

![receptive field](receptive_field.png)
"""
