"""Tasks: what a model is trained for. Each module here is one task, implementing the loop's
`qkv.train.Task` protocol (data, model shape, loss, validation metric, saved files).

Adding a task: one new module, a `Task` literal in config.py, and a case in `task_for`.
"""

from __future__ import annotations

from pathlib import Path

from .. import checkpoint
from ..config import ModelConfig, TrainConfig
from ..tokenizer import Subwords, Tokenizer, load_tokenizer
from ..train import Task

# what an encoder started from another model (init_from) takes of its shape
ENCODER_SHAPE = (
    "d_model",
    "n_heads",
    "d_ff",
    "n_encoder_layers",
    "activation",
    "norm_first",
    "positions",
    "max_len",
    "scale_embedding",
    "bias",
    "layer_norm_eps",
)
SPECIAL = ("pad_id", "bos_id", "eos_id")


def task_for(cfg: TrainConfig) -> Task:
    """The task a training config names."""
    match cfg.task:
        case "translation":
            from .translation import Translation

            return Translation(cfg)
        case "lm":
            from .lm import LanguageModel

            return LanguageModel(cfg)
        case "classify":
            from .classify import Classification

            return Classification(cfg)
        case "similarity":
            from .similarity import Similarity

            return Similarity(cfg)
        case "items":
            from .items import NextItem

            return NextItem(cfg)
    raise AssertionError(cfg.task)  # TrainConfig validated it


def encoder_start(
    cfg: TrainConfig, base: ModelConfig, texts: list[str], out: Path, resume: bool
) -> tuple[Tokenizer, ModelConfig]:
    """The tokenizer and shape of an encoder task's model. From scratch: a BPE vocabulary of
    cfg.vocab_size trained on `texts`. With cfg.init_from: that model's tokenizer and encoder
    shape (the loop then copies its encoder's weights in). The shape comes back with the
    vocabulary size and special ids filled in."""
    if cfg.init_from:
        init_cfg, _ = checkpoint.read_config(cfg.init_from)
        source = checkpoint.resolve(cfg.init_from)
        tok = load_tokenizer(out if resume else source, init_cfg)
        if tok is None:
            raise checkpoint.CheckpointError(f"{source}: the model directory has no tokenizer")
        out.mkdir(parents=True, exist_ok=True)
        tok.save(out)
        shape = {k: getattr(init_cfg, k) for k in ("vocab_size", *ENCODER_SHAPE, *SPECIAL)}
        return tok, base.replace(**shape)
    path = out / Subwords.FILE
    if resume and path.is_file():
        tok = Subwords.load(path)
    else:
        tok = Subwords.train(texts, cfg.vocab_size)
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.write_text_atomic(path, tok.to_str())
    return tok, base.replace(vocab_size=tok.vocab_size, **tok.special_ids)


def decoder_only(base: ModelConfig, tokenizer, context: int) -> ModelConfig:
    """The shape of a decoder-only task's model (language model, next item): `base` with the
    tokenizer's vocabulary and special ids, positions for `context` tokens, no encoder."""
    return base.replace(
        arch="decoder-only",
        vocab_size=tokenizer.vocab_size,
        tgt_vocab_size=None,
        n_encoder_layers=0,
        share_embeddings=False,
        max_len=context,
        **tokenizer.special_ids,
    )


def sentence_limit(cfg: TrainConfig, base: ModelConfig) -> int:
    """Tokens kept of each sentence (eos comes on top): max_tokens_per_sentence, and with
    init_from no more than the started-from model has positions for."""
    if cfg.init_from:
        return min(cfg.max_tokens_per_sentence, base.max_len - 1)
    return cfg.max_tokens_per_sentence
