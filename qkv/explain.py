"""Attention during a real translation: every layer's and head's weights (encoder self,
decoder self, cross) for the output the model actually produced.

Greedy output is recorded step by step while it is generated. For beam search the weights along
the chosen hypothesis are those of one teacher-forced pass over it: incremental decoding equals
the full forward (tests/test_models.py), so these are the weights the search computed for that
hypothesis, without following it through every beam reorder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .inspect import record_attention
from .search import Limits, greedy, model_step
from .translate import DecodeOptions, Translator

KINDS = {"self_attn": "decoder self", "cross_attn": "cross"}


@dataclass
class Explanation:
    source: str
    translation: str
    src_tokens: list[str]  # subwords of the source, with </s>
    tgt_in: list[str]  # decoder inputs: <s> + output subwords
    tgt_out: list[str]  # what each decoder position predicted: output subwords + </s>
    # kind ("encoder self", "decoder self", "cross") -> per layer (H, T, S)
    attention: dict[str, list[Tensor]]
    mode: str

    def alignment(self) -> Tensor:
        """Cross-attention averaged over all layers and heads: (T, S), a soft word alignment."""
        return torch.stack(self.attention["cross"]).mean(dim=(0, 1))

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "translation": self.translation,
            "mode": self.mode,
            "src_tokens": self.src_tokens,
            "tgt_in": self.tgt_in,
            "tgt_out": self.tgt_out,
            "attention": {
                kind: [
                    [[[round(float(x), 5) for x in row] for row in head] for head in layer]
                    for layer in layers
                ]
                for kind, layers in self.attention.items()
            },
        }


def attention_kind(path: str) -> str:
    if path.startswith("encoder"):
        return "encoder self"
    return KINDS[path.rsplit(".", 1)[-1]]


def _by_kind(recorded: dict[str, Tensor]) -> dict[str, list[Tensor]]:
    out: dict[str, list[Tensor]] = {"encoder self": [], "decoder self": [], "cross": []}
    # module paths sort by layer number within each kind (fewer than 10 layers; else numeric)
    for path in sorted(
        recorded, key=lambda p: [int(x) if x.isdigit() else x for x in p.split(".")]
    ):
        out[attention_kind(path)].append(recorded[path])
    return out


@torch.inference_mode()
def explain(
    translator: Translator, sentence: str, opts: DecodeOptions = DecodeOptions()
) -> Explanation:
    """Translate one sentence and capture all attention along the output."""
    model, tok, cfg = translator.model, translator.tok, translator.cfg
    src_ids = translator.encode_sources([sentence])[0]
    src = torch.tensor([src_ids])
    use_greedy = opts.greedy or opts.beam == 1
    if use_greedy:
        limits = Limits(opts.max_len_a, opts.max_len_b, opts.min_len, cap=cfg.max_len - 1)
        with record_attention(model) as rec:
            cache = model.start(src)
            (hyp,) = greedy(
                model_step(model),
                cache,
                torch.tensor([len(src_ids)]),
                bos=cfg.bos_id,
                eos=cfg.eos_id,
                limits=limits,
                no_repeat=opts.no_repeat_ngram,
                pad=cfg.pad_id,
            )
        out_ids = hyp.tokens
        t = len(out_ids) + 1
        recorded = {}
        for path, steps in rec.items():
            if path.startswith("encoder"):
                recorded[path] = steps[0][0]  # (H, S, S)
            elif path.endswith("cross_attn"):
                recorded[path] = torch.cat([w[0] for w in steps], dim=1)[:, :t]  # (H, T, S)
            else:  # self-attention rows grow by one key per step: pad into a triangle
                full = torch.zeros(steps[0].shape[1], t, t)
                for i, w in enumerate(steps[:t]):
                    full[:, i, : i + 1] = w[0, :, 0]
                recorded[path] = full
    else:
        nbest = translator.translate_ids([src_ids], DecodeOptions(**{**opts.__dict__, "nbest": 1}))
        out_ids = nbest[0][0].tokens
        tgt = torch.tensor([[cfg.bos_id] + out_ids])
        with record_attention(model) as rec:
            model(src, tgt)
        recorded = {path: steps[0][0] for path, steps in rec.items()}
    pieces = [tok.id_to_token(i) for i in out_ids]
    return Explanation(
        source=sentence,
        translation=tok.decode(out_ids),
        src_tokens=[tok.id_to_token(i) for i in src_ids],
        tgt_in=["<s>"] + pieces,
        tgt_out=pieces + ["</s>"],
        attention=_by_kind(recorded),
        mode="greedy" if use_greedy else f"beam {opts.beam}",
    )
