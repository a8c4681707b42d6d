"""Configurations as frozen dataclasses, validated on construction, with a JSON round trip.

Only `from_config` factories read a config; every module below them takes plain arguments.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, TypeVar

Arch = Literal["encoder-decoder", "decoder-only", "encoder-only"]
Activation = Literal["relu", "gelu", "silu"]
Positions = Literal["sinusoidal", "learned"]


class ConfigError(ValueError):
    """A config value or key that cannot work; the message is one line."""


C = TypeVar("C")


def _check_literal(name: str, value: Any, tp: Any) -> None:
    allowed = typing.get_args(tp)
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def from_dict(cls: type[C], data: dict[str, Any], *, source: str = "config") -> C:
    """Build a config dataclass from a dict; unknown keys fail loudly."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)} for {cls.__name__}")
    try:
        return cls(**data)
    except TypeError as e:  # wrong value types that __post_init__ did not catch
        raise ConfigError(f"{source}: {e}") from None


def load_json(cls: type[C], path: str | Path) -> C:
    """Read a config dataclass from a JSON file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return from_dict(cls, data, source=str(path))


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _check_types(config: Any) -> None:
    """Reject values whose type is plainly wrong (JSON gives "3" or 3.5 for an int field)."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        value, tp = getattr(config, f.name), hints[f.name]
        if typing.get_origin(tp) is Literal:
            _check_literal(f.name, value, tp)
            continue
        allowed = tuple(t for t in typing.get_args(tp) or (tp,) if isinstance(t, type))
        if type(None) in allowed and value is None:
            continue
        ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            names = "/".join(t.__name__ for t in allowed)
            raise ConfigError(f"{f.name} must be {names}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Transformer. Defaults: the small translation model (d=256, 3+3 layers)."""

    arch: Arch = "encoder-decoder"
    vocab_size: int = 8000  # source vocabulary (or the only one)
    tgt_vocab_size: int | None = None  # None: same as vocab_size
    d_model: int = 256
    n_heads: int = 8
    d_ff: int = 1024
    n_encoder_layers: int = 3
    n_decoder_layers: int = 3
    dropout: float = 0.1  # on embeddings and on each sublayer's output before the skip add
    attention_dropout: float | None = None  # on attention weights; None: same as dropout
    activation_dropout: float | None = None  # inside the feed-forward; None: same as dropout
    activation: Activation = "relu"
    norm_first: bool = True  # pre-LN; False is the original paper's post-LN
    positions: Positions = "sinusoidal"
    max_len: int = 256
    scale_embedding: bool = True  # multiply token embeddings by sqrt(d_model)
    tie_output: bool = True  # decoder input embedding == output projection
    share_embeddings: bool = False  # source and target embeddings are one matrix
    output_bias: bool = False  # a bias on the final logits (Marian has one)
    layer_norm_eps: float = 1e-5
    n_classes: int | None = None  # encoder-only: a classification head on the pooled embedding
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        _check_types(self)
        positive = ["vocab_size", "d_model", "n_heads", "d_ff", "max_len"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.tgt_vocab_size is not None and self.tgt_vocab_size <= 0:
            raise ConfigError(f"tgt_vocab_size must be positive, got {self.tgt_vocab_size}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            p = getattr(self, name)
            if p is not None and not 0.0 <= p < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {p}")
        if self.n_encoder_layers < 0 or self.n_decoder_layers < 0:
            raise ConfigError("layer counts must be >= 0")
        if self.arch != "decoder-only" and self.n_encoder_layers == 0:
            raise ConfigError(f"{self.arch} needs n_encoder_layers >= 1")
        if self.arch != "encoder-only" and self.n_decoder_layers == 0:
            raise ConfigError(f"{self.arch} needs n_decoder_layers >= 1")
        if self.share_embeddings and self.tgt_vocab_size not in (None, self.vocab_size):
            raise ConfigError("share_embeddings needs tgt_vocab_size == vocab_size (or unset)")
        if self.n_classes is not None and self.n_classes < 2:
            raise ConfigError(f"n_classes must be >= 2, got {self.n_classes}")
        for name in ("pad_id", "bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < min(self.vocab_size, self.target_vocab):
                raise ConfigError(f"{name} must be a valid token id, got {getattr(self, name)}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def target_vocab(self) -> int:
        return self.tgt_vocab_size or self.vocab_size

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return from_dict(cls, json.loads(text))


@dataclass(frozen=True)
class TrainConfig:
    """How to train: data, batching, optimisation, evaluation and when to stop."""

    # data: a named data set, or the user's own files
    dataset: str | None = "multi30k"
    src_lang: str = "de"
    tgt_lang: str = "en"
    src_file: str | None = None  # with tgt_file: one sentence per line, plain or .gz
    tgt_file: str | None = None
    tsv_file: str | None = None  # or source<TAB>target per line
    valid_src_file: str | None = None
    valid_tgt_file: str | None = None
    data_dir: str | None = None  # where named data sets are looked up first
    max_chars: int = 1000  # longer pairs are skipped (and counted)
    max_tokens_per_sentence: int = 128
    # subwords
    vocab_size: int = 8000
    # batching and optimisation
    max_tokens: int = 4096  # padded tokens (source or target, the larger) per batch
    accumulate: int = 1  # batches per optimizer step
    lr: float = 1e-3  # peak, reached after warmup, then decays as 1/sqrt(step)
    warmup: int = 800
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    # when to stop (whichever comes first; 0 = no limit)
    max_steps: int = 0
    max_epochs: int = 0
    max_minutes: float = 0.0
    # evaluation and checkpoints
    eval_every: int = 500  # steps
    eval_sentences: int = 500  # validation sentences decoded for BLEU (0 = all)
    eval_beam: int = 1  # 1 = greedy during training (fast)
    save_every: int = 250  # steps between resumable checkpoints
    average_last: int = 0  # also write the average of the last N evaluated checkpoints
    seed: int = 1
    threads: int = 0  # torch threads, 0 = PyTorch's default
    log_every: int = 20

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):  # from JSON
            object.__setattr__(self, "betas", tuple(self.betas))
        for name in (
            "vocab_size",
            "max_tokens",
            "accumulate",
            "eval_every",
            "save_every",
            "log_every",
            "max_tokens_per_sentence",
            "max_chars",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in (
            "max_steps",
            "max_epochs",
            "warmup",
            "average_last",
            "eval_sentences",
            "threads",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        if not (isinstance(self.lr, int | float) and self.lr > 0):
            raise ConfigError(f"lr must be positive, got {self.lr!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.max_minutes < 0:
            raise ConfigError(f"max_minutes must be >= 0, got {self.max_minutes}")
        if self.eval_beam < 1:
            raise ConfigError(f"eval_beam must be >= 1, got {self.eval_beam}")
        if (self.src_file is None) != (self.tgt_file is None):
            raise ConfigError("give both src_file and tgt_file, or neither")
        if (self.valid_src_file is None) != (self.valid_tgt_file is None):
            raise ConfigError("give both valid_src_file and valid_tgt_file, or neither")
        if self.dataset is None and self.src_file is None and self.tsv_file is None:
            raise ConfigError("no training data: set dataset, src_file/tgt_file or tsv_file")
        if self.dataset not in (None, "multi30k"):
            raise ConfigError(f"unknown dataset {self.dataset!r} (known: multi30k)")
        if self.src_lang == self.tgt_lang and self.dataset is not None and self.src_file is None:
            raise ConfigError("src_lang and tgt_lang must differ")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)
