"""The length penalty, tuned on held-out data and kept with the model (decoding.json).

Beam search ranks finished hypotheses by their log-probability divided by a length penalty,
((5 + L) / 6) ** alpha (qkv.search.length_penalty). A small alpha favours short outputs, which
BLEU's brevity penalty then punishes; the best alpha depends on the model and the language
pair (on Multi30k, 1.3-2.0 beat the customary 0.6 by 0.6-1.8 BLEU on the validation set in
both directions; bench/README.md has how that carried to the test set). So it is measured, not
assumed: beam-search the validation set with each candidate and keep the best in the model
directory's decoding.json (as HF keeps a generation_config.json). The commands and the server
take it as their default; a flag or a request field still overrides it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .checkpoint import CheckpointError
from .config import ConfigError, DecodeConfig, read_json
from .evaluate import bleu

FILE = "decoding.json"
# how a hypothesis is scored and cut; not which strategy or beam, which each call chooses
STORED = (
    "alpha",
    "penalty",
    "max_len_a",
    "max_len_b",
    "min_len",
    "at_max",
    "finish",
    "no_repeat_ngram",
)
BEAM = DecodeConfig(strategy="beam")  # beam 5, the defaults
SENTENCES = 1000  # validation sentences decoded per candidate (all of Multi30k's 1,014 but 14)


def read(path: str | Path) -> dict[str, Any]:
    """The decoding defaults a model directory keeps: {} without a decoding.json;
    CheckpointError (one line) for one that is not valid."""
    f = checkpoint.resolve(path) / FILE
    if not f.is_file():
        return {}
    try:
        data = read_json(f)
        if not isinstance(data, dict):
            raise ConfigError(f"{f}: expected a JSON object")
        values = {k: v for k, v in data.items() if k != "tuned"}  # "tuned": how, for people
        unknown = sorted(set(values) - set(STORED))
        if unknown:
            raise ConfigError(
                f"{f}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(STORED)})"
            )
        DecodeConfig(**values)  # a bad value fails here, on one line, not in the middle of a run
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{f}: {e}" if str(f) not in str(e) else str(e)) from None
    return values


@dataclass
class Tuned:
    alpha: float  # the best
    bleu: dict[float, float]  # validation BLEU for each candidate
    beam: int
    sentences: int
    penalty: str = "gnmt"  # the length penalty's form the alphas were tried with


def base_config(path: str | Path, beam: int = 5) -> DecodeConfig:
    """Beam search as the model directory's decoding.json says (its other fields too: the
    alpha is tuned in the setting the model is decoded in)."""
    return DecodeConfig(strategy="beam", beam=beam, **read(path))


def tune_alpha(
    translate: Callable[[list[str], DecodeConfig], list[str]],
    pairs: Sequence[tuple[str, str]],
    target_lang: str | None,
    alphas: Sequence[float],
    base: DecodeConfig = BEAM,
    log: Callable[[str], None] = lambda _: None,
) -> Tuned:
    """Beam-search the sources of (source, reference) pairs once per alpha (the rest as `base`
    says); the alpha with the highest BLEU wins (a tie: the smaller alpha)."""
    if not alphas:
        raise ValueError("no alpha to try")
    if not pairs:
        raise ValueError("no sentences to tune on")
    sources, refs = [s for s, _ in pairs], [t for _, t in pairs]
    scores: dict[float, float] = {}
    for a in alphas:
        hyps = translate(sources, base.replace(alpha=a))
        scores[a] = bleu(hyps, refs, target_lang)
        log(f"  alpha {a:g}: BLEU {scores[a]:.2f} (beam {base.beam}, {len(pairs)} sentences)")
    best = max(scores, key=lambda a: (scores[a], -a))
    return Tuned(best, scores, base.beam, len(pairs), base.penalty)


def save(path: str | Path, tuned: Tuned, split: str) -> Path:
    """Write decoding.json (and refresh the manifest) in model directory `path`, keeping the
    other fields it already held; the file written."""
    directory = checkpoint.resolve(path)
    data = {
        **read(directory),
        "alpha": tuned.alpha,
        "penalty": tuned.penalty,
        "tuned": {
            "on": split,
            "sentences": tuned.sentences,
            "beam": tuned.beam,
            "bleu": {f"{a:g}": round(s, 2) for a, s in tuned.bleu.items()},
        },
    }
    checkpoint.add_file(directory, FILE, json.dumps(data, indent=2) + "\n")
    return directory / FILE


def tune_model_dir(
    path: str | Path,
    pairs: Sequence[tuple[str, str]],
    target_lang: str | None,
    alphas: Sequence[float],
    split: str,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = lambda _: None,
) -> Tuned:
    """Tune the alpha of the translation model in `path` (packed for speed, as `qkv evaluate`
    decodes it) on `pairs`, and keep it in its decoding.json."""
    from .packed import pack
    from .translate import Translator

    model, tok, _ = checkpoint.load(path, device)
    if tok is None:
        raise CheckpointError(f"{path}: the model directory has no tokenizer")
    translator = Translator(pack(model), tok)  # pack: fp32, a no-op off the CPU
    base = base_config(path)
    tuned = tune_alpha(translator.translate_best, pairs, target_lang, alphas, base, log)
    save(path, tuned, split)
    return tuned
