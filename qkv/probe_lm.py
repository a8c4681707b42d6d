"""The probe's questions for a decoder-only language model, answered on validation text with the
validation loss (nats per token) where the translation probe uses BLEU:

- focus: per-head attention entropy, max weight, and how far back each head looks (mean
  distance from query to key, and the weight on the previous token);
- redundancy: the loss with each head masked alone, and a pruning curve;
- mitigation: the loss with an attention sublayer skipped, a layer removed, a skip connection
  removed;
- receptive field: how many earlier positions measurably change a position's vector, by depth
  (a causal model sees only the past, so this grows with depth up to the position itself).

`probe_lm` returns an `LMProbeReport`; `write_lm_report` draws and writes it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import plot
from .checkpoint import write_text_atomic
from .inspect import (
    ablate,
    attention_modules,
    head_stats,
    mask_heads,
    module_order,
    record_attention,
)
from .models import DecoderOnly, device_of
from .probe import positions_that_matter
from .tasks.lm import spread
from .tokenizer import SPECIALS

FRACTIONS = (0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9)


@dataclass
class LMProbeReport:
    windows: int
    window: int
    loss: float  # nats per token, all heads on
    # "entropy" / "max_weight" / "distance" / "previous" -> per layer, per head
    focus: dict[str, list[list[float]]] = field(default_factory=dict)
    single_head: list[dict[str, Any]] = field(default_factory=list)  # module, head, loss
    pruning: list[dict[str, float]] = field(default_factory=list)  # fraction, removed, loss
    ablations: list[dict[str, Any]] = field(default_factory=list)  # ablation, layer, loss
    # threshold -> per depth (0 = embeddings): mean earlier positions that change a position
    receptive_field: dict[float, list[float]] = field(default_factory=dict)
    receptive_field_windows: int = 0
    minutes: float = 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["receptive_field"] = {str(t): v for t, v in self.receptive_field.items()}
        return data


class LMProber:
    def __init__(self, model: DecoderOnly, windows: Tensor, log: Callable[[str], None]):
        """windows: (N, T + 1) token ids: each row is scored on predicting its tokens 1..T."""
        self.model, self.log = model, log
        self.windows = windows.to(device_of(model))

    @torch.inference_mode()
    def loss(self) -> float:
        total, n = 0.0, 0
        for w in self.windows.split(32):
            logits = self.model(w[:, :-1]).float()
            total += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum"
            ).item()
            n += w[:, 1:].numel()
        return total / n

    @torch.inference_mode()
    def focus(self) -> dict[str, list[list[float]]]:
        sums: dict[str, list[Tensor]] = {}
        for w in self.windows.split(32):
            with record_attention(self.model) as rec:
                self.model(w[:, :-1])
            for path, (a,) in rec.items():  # (B, H, T, T), causal
                t = a.shape[-1]
                ent, top = head_stats(a)
                pos = torch.arange(t, device=a.device, dtype=a.dtype)
                dist = (a * (pos[:, None] - pos[None, :]).clamp_min(0)).sum(-1).mean((0, 2))
                prev = a.diagonal(-1, -2, -1).mean((0, 2))  # weight on key i-1, over i >= 1
                stats = torch.stack([ent, top, dist, prev])
                sums[path] = sums.get(path, torch.zeros_like(stats)) + stats * len(w)
        n = len(self.windows)
        out: dict[str, list[list[float]]] = {k: [] for k in ("entropy", "max_weight")}
        out.update(distance=[], previous=[])
        for path in sorted(sums, key=module_order):
            for name, row in zip(out, (sums[path] / n).tolist(), strict=True):
                out[name].append(row)
        return out

    def heads(self) -> list[tuple[str, int]]:
        modules = attention_modules(self.model)
        return [
            (p, h) for p in sorted(modules, key=module_order) for h in range(modules[p].n_heads)
        ]

    def single_heads(self) -> list[dict[str, Any]]:
        rows = []
        for path, h in self.heads():
            with mask_heads(self.model, {path: [h]}):
                rows.append({"module": path, "head": h, "loss": self.loss()})
            self.log(f"  head {path}[{h}] masked: loss {rows[-1]['loss']:.3f}")
        return rows

    def pruning_curve(self, single: list[dict[str, Any]]) -> list[dict[str, float]]:
        order = sorted(single, key=lambda r: r["loss"])
        curve = []
        for f in FRACTIONS:
            k = round(f * len(order))
            groups: dict[str, list[int]] = {}
            for r in order[:k]:
                groups.setdefault(r["module"], []).append(r["head"])
            with mask_heads(self.model, groups):
                curve.append({"fraction": f, "removed": k, "loss": self.loss()})
        return curve

    def ablations(self) -> list[dict[str, Any]]:
        rows = []
        for i in range(len(self.model.decoder.layers)):
            layer = f"decoder.layers.{i}"
            parts = [
                ("skip attention sublayer", {"bypass": [f"{layer}.attn_residual"]}),
                ("skip feed-forward sublayer", {"bypass": [f"{layer}.ff_residual"]}),
                ("remove layer", {"bypass": [layer]}),
                ("remove skip connection (attn)", {"no_skip": [f"{layer}.attn_residual"]}),
                ("remove skip connection (ff)", {"no_skip": [f"{layer}.ff_residual"]}),
            ]
            for what, kw in parts:
                with ablate(self.model, **kw):
                    rows.append({"ablation": what, "layer": layer, "loss": self.loss()})
                self.log(f"  {what} in {layer}: loss {rows[-1]['loss']:.3f}")
        return rows

    @torch.inference_mode()
    def receptive_field(self, n: int, thresholds: tuple[float, ...]) -> dict[float, list[float]]:
        """Change one token at a time (to the next ordinary id); count for each
        position the earlier positions whose replacement changes its vector at each depth by
        more than `threshold` of its norm. Averaged over positions and windows."""
        dec = self.model.decoder
        vocab = self.model.config.vocab_size
        first = len(SPECIALS)  # ordinary tokens: ids first .. vocab - 1
        return positions_that_matter(
            [dec.embed, *dec.layers],
            self.model,
            self.windows[:n, :-1],
            lambda w: first + (w + 1 - first) % (vocab - first),  # the next ordinary token
            thresholds,
        )


def probe_lm(
    model: DecoderOnly,
    ids: Tensor,
    *,
    windows: int = 64,
    receptive_windows: int = 8,
    log: Callable[[str], None] = print,
) -> LMProbeReport:
    """Probe `model` on validation token ids (1-D): `windows` windows of the model's context,
    spread evenly over the text."""
    t0 = time.monotonic()
    t = model.config.max_len
    starts = spread(list(range(0, len(ids) - t, t)), windows)
    if not starts:
        raise ValueError(f"the validation text has {len(ids)} tokens: less than one window of {t}")
    n = len(starts)
    rows = torch.stack([ids[s : s + t + 1] for s in starts])
    p = LMProber(model, rows, log)
    r = LMProbeReport(n, t, p.loss())
    log(f"probing on {n} windows of {t} tokens: loss {r.loss:.3f} nats/token")
    log("focus: entropy, max weight, distance, previous-token weight per head")
    r.focus = p.focus()
    log("redundancy: masking one head at a time")
    r.single_head = p.single_heads()
    r.pruning = p.pruning_curve(r.single_head)
    log("mitigation: skipping sublayers, removing layers and skip connections")
    r.ablations = p.ablations()
    log("receptive field: which earlier positions change each depth")
    r.receptive_field_windows = min(receptive_windows, n)
    r.receptive_field = p.receptive_field(r.receptive_field_windows, (0.01, 0.1))
    r.minutes = (time.monotonic() - t0) / 60
    return r


def write_lm_report(r: LMProbeReport, out_dir: str | Path) -> Path:
    """Charts, report.json and report.md in out_dir; returns report.md's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = {
        "focus_entropy.png": ("entropy", "mean attention entropy (nats)", "viridis_r"),
        "focus_max_weight.png": ("max_weight", "mean max attention weight", "Blues"),
        "focus_distance.png": ("distance", "mean distance looked back (tokens)", "Greens"),
        "focus_previous.png": ("previous", "mean weight on the previous token", "Purples"),
    }
    for name, (key, title, cmap) in tables.items():
        plot.layer_head_table({"self": torch.tensor(r.focus[key])}, title, out / name, cmap=cmap)
    layers = len(r.focus["entropy"])
    drop = [[0.0] * len(r.focus["entropy"][0]) for _ in range(layers)]
    for h in r.single_head:
        drop[int(h["module"].split(".")[2])][h["head"]] = h["loss"] - r.loss
    plot.layer_head_table(
        {"self": torch.tensor(drop)},
        "loss increase when this one head is masked (nats/token)",
        out / "head_masking.png",
        cmap="Reds",
        fmt="{:.3f}",
    )
    plot.lines(
        {"loss": ([c["fraction"] for c in r.pruning], [c["loss"] for c in r.pruning])},
        "pruning heads, least important first",
        "fraction of heads removed",
        "validation loss (nats/token)",
        out / "pruning.png",
    )
    plot.bars(
        {f"{a['ablation']} · {a['layer']}": a["loss"] for a in r.ablations},
        "validation loss with one part taken out",
        "nats/token",
        out / "ablations.png",
        reference=r.loss,
    )
    plot.lines(
        {
            f"change > {t * 100:g}% of the vector": (list(range(len(v))), v)
            for t, v in r.receptive_field.items()
        },
        "receptive field by depth (0 = embeddings)",
        "depth",
        "mean number of earlier positions that matter",
        out / "receptive_field.png",
    )
    write_text_atomic(out / "report.json", json.dumps(r.to_json(), indent=2))
    write_text_atomic(out / "report.md", lm_markdown(r))
    return out / "report.md"


def lm_markdown(r: LMProbeReport) -> str:
    f = r.focus
    flat = {k: [x for row in v for x in row] for k, v in f.items()}
    heads = sorted(r.single_head, key=lambda h: -h["loss"])
    top = heads[0]
    harmless = sum(1 for h in heads if h["loss"] - r.loss < 0.01)
    prune = "\n".join(
        f"| {c['fraction']:.2f} | {c['removed']} | {c['loss']:.3f} | {c['loss'] - r.loss:+.3f} |"
        for c in r.pruning
    )
    abl = "\n".join(
        f"| {a['layer']} | {a['ablation']} | {a['loss']:.3f} | {a['loss'] - r.loss:+.3f} |"
        for a in r.ablations
    )
    rf = r.receptive_field
    rf_rows = "\n".join(
        f"| {d} | " + " | ".join(f"{rf[t][d]:.1f}" for t in rf) + " |"
        for d in range(len(next(iter(rf.values()))))
    )
    prev_head = max(
        ((li, h, x) for li, row in enumerate(f["previous"]) for h, x in enumerate(row)),
        key=lambda z: z[2],
    )
    return f"""# qkv probe (language model)

{r.windows} validation windows of {r.window} tokens; loss **{r.loss:.3f}** nats/token with every
head on; {r.minutes:.1f} minutes.

## Focus: where do heads look?
Entropy of each head's attention rows: {min(flat["entropy"]):.2f} to {max(flat["entropy"]):.2f}
nats (mean {sum(flat["entropy"]) / len(flat["entropy"]):.2f}); mean distance looked back
{min(flat["distance"]):.1f} to {max(flat["distance"]):.1f} tokens. The most "previous-token" head
is layer {prev_head[0]} head {prev_head[1]}: {prev_head[2]:.2f} of its weight on the token just
before.

![entropy](focus_entropy.png) ![distance](focus_distance.png)
![previous](focus_previous.png) ![max weight](focus_max_weight.png)

## Redundancy: do heads cover for one another?
Masking one head at a time: {harmless} of {len(heads)} heads cost less than 0.01 nats/token. The
most important is {top["module"]}[{top["head"]}]: loss {top["loss"]:.3f}
({top["loss"] - r.loss:+.3f}).

![head masking](head_masking.png)

| fraction | heads removed | loss | change |
|---:|---:|---:|---:|
{prune}

![pruning](pruning.png)

## Mitigation: do skip connections and other layers absorb a broken part?

| layer | ablation | loss | change |
|---|---|---:|---:|
{abl}

![ablations](ablations.png)

## Receptive field: does depth widen what a position sees?
Changing one token at a time: the mean number of positions (itself and earlier ones: the model
is causal) whose change moves a position's vector by more than the threshold, by depth;
{r.receptive_field_windows} windows.

| depth | {" | ".join(f"> {t * 100:g}%" for t in rf)} |
|---:|{"---:|" * len(rf)}
{rf_rows}

![receptive field](receptive_field.png)
"""
