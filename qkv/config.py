"""Configurations as frozen dataclasses, validated on construction, with a JSON round trip.

Only `from_config` factories read a config; every module below them takes plain arguments.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar

Arch = Literal["encoder-decoder", "decoder-only", "encoder-only", "gru", "gru-attention"]
Activation = Literal["relu", "gelu", "silu"]
Positions = Literal["sinusoidal", "learned"]
Strategy = Literal["greedy", "sample", "beam"]
Penalty = Literal["gnmt", "power"]
AtMax = Literal["eos", "stop"]
Finish = Literal["heuristic", "exact"]
Pooling = Literal["mean", "weighted", "max", "first"]


class ConfigError(ValueError):
    """A config value or key that cannot work; the message is one line."""


C = TypeVar("C")


def _check_literal(name: str, value: Any, tp: Any) -> None:
    allowed = typing.get_args(tp)
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def knob(default: Any, help: str) -> Any:
    """A config field with its meaning; the CLI shows it (and the default) in --help."""
    return field(default=default, metadata={"help": help})


def help_of(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def from_dict(cls: type[C], data: dict[str, Any], *, source: str = "config") -> C:
    """Build a config dataclass from a dict; unknown keys fail loudly."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        shown = ", ".join(json.dumps(k)[1:-1] for k in unknown)  # escapes a newline in a key
        raise ConfigError(f"{source}: unknown key(s) {shown} for {cls.__name__}")
    try:
        return cls(**data)
    except TypeError as e:  # wrong value types that __post_init__ did not catch
        raise ConfigError(f"{source}: {e}") from None


def read_json(path: str | Path) -> Any:
    """A JSON file's contents; ConfigError (one line naming the file) if it cannot be read."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def load_json(cls: type[C], path: str | Path) -> C:
    """Read a config dataclass from a JSON file."""
    return from_dict(cls, read_json(path), source=str(path))


def read_sections(path: str | Path, required: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """A run file {"model": {...}, "train": {...}} (either section optional unless required)."""
    data = read_json(path)
    if not isinstance(data, dict) or set(data) - {"model", "train"}:
        raise ConfigError(f"{path}: expected an object with 'model' and/or 'train'")
    missing = [k for k in required if k not in data]
    if missing:
        raise ConfigError(f"{path}: lacks {', '.join(missing)}: not a qkv run config")
    return data


def apply_file(
    model: ModelConfig, train: TrainConfig, path: str | Path
) -> tuple[ModelConfig, TrainConfig]:
    """The configs with a run file's values laid over them."""
    data, src = read_sections(path), str(path)
    return (
        from_dict(ModelConfig, {**to_dict(model), **data.get("model", {})}, source=src),
        from_dict(TrainConfig, {**to_dict(train), **data.get("train", {})}, source=src),
    )


def read_run_config(path: str | Path) -> tuple[ModelConfig, TrainConfig]:
    """The configs a run was started with (its train_config.json)."""
    data, src = read_sections(path, required=("model", "train")), str(path)
    return from_dict(ModelConfig, data["model"], source=src), from_dict(
        TrainConfig, data["train"], source=src
    )


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _check_types(config: Any) -> None:
    """Reject values whose type is plainly wrong (JSON gives "3" or 3.5 for an int field)."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        value, tp = getattr(config, f.name), hints[f.name]
        if typing.get_origin(tp) is Literal:
            _check_literal(f.name, value, tp)
            continue
        if typing.get_origin(tp) is tuple:
            if not (isinstance(value, tuple) and all(_is_number(x) for x in value)):
                raise ConfigError(f"{f.name} must be a list of numbers, got {value!r}")
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

    arch: Arch = knob(
        "encoder-decoder",
        "which of the three Transformers, or a recurrent translation baseline (gru: fixed "
        "vector, gru-attention: additive attention)",
    )
    vocab_size: int = knob(8000, "source vocabulary size (or the only one)")
    tgt_vocab_size: int | None = knob(None, "target vocabulary size; None: same as vocab_size")
    d_model: int = knob(256, "width of every hidden vector")
    n_heads: int = knob(8, "attention heads per layer (d_model must divide by it)")
    d_ff: int = knob(1024, "inner width of the feed-forward sublayer")
    n_encoder_layers: int = knob(3, "encoder layers")
    n_decoder_layers: int = knob(3, "decoder layers")
    dropout: float = knob(0.1, "dropout on embeddings and on each sublayer's output")
    attention_dropout: float | None = knob(None, "dropout on attention weights; None: dropout")
    activation_dropout: float | None = knob(None, "dropout inside the feed-forward; None: dropout")
    activation: Activation = knob("relu", "the feed-forward's nonlinearity")
    norm_first: bool = knob(True, "pre-LN (true) or the original paper's post-LN (false)")
    positions: Positions = knob("sinusoidal", "how positions are encoded")
    max_len: int = knob(256, "most positions a sequence may have")
    scale_embedding: bool = knob(True, "multiply token embeddings by sqrt(d_model)")
    tie_output: bool = knob(True, "the output projection is the decoder's input embedding")
    share_embeddings: bool = knob(False, "source and target embeddings are one matrix")
    output_bias: bool = knob(False, "a bias on the final logits (Marian has one)")
    bias: bool = knob(True, "biases in the linear layers and LayerNorms (nanoGPT: none)")
    layer_norm_eps: float = knob(1e-5, "LayerNorm epsilon")
    n_classes: int | None = knob(None, "encoder-only: classes of a head on the pooled embedding")
    pooling: Pooling = knob(
        "mean", "encoder-only: sentence vector: mean, frequency-weighted mean, max, or first token"
    )
    pad_id: int = knob(0, "padding token id")
    bos_id: int = knob(1, "start-of-sequence token id (the decoder's first input)")
    eos_id: int = knob(2, "end-of-sequence token id")

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

    @property
    def attention_dropout_p(self) -> float:
        return self.dropout if self.attention_dropout is None else self.attention_dropout

    @property
    def activation_dropout_p(self) -> float:
        return self.dropout if self.activation_dropout is None else self.activation_dropout

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return from_dict(cls, json.loads(text))


Task = Literal["translation", "lm", "classify", "similarity", "items"]
ItemLoss = Literal["ce", "bce"]
TokenizerKind = Literal["bpe", "char"]
Schedule = Literal["inverse_sqrt", "cosine"]
Precision = Literal["auto", "fp32", "bf16"]
DATASETS = {
    "multi30k": "translation",
    "tatoeba": "translation",
    "tinyshakespeare": "lm",
    "sst2": "classify",
    "stsb": "similarity",
    "ml-1m": "items",
}


@dataclass(frozen=True)
class TrainConfig:
    """How to train: the task and its data, batching, optimisation, evaluation, when to stop."""

    task: Task = knob("translation", "what the model learns (the task decides data and metric)")
    # data: a named data set, or the user's own files
    dataset: str | None = knob("multi30k", "a named data set; None: your own files")
    src_lang: str = knob("de", "source language of the named data set")
    tgt_lang: str = knob("en", "target language of the named data set")
    src_file: str | None = knob(None, "your source sentences, one per line (plain or .gz)")
    tgt_file: str | None = knob(None, "your target sentences, line-aligned with src_file")
    tsv_file: str | None = knob(None, "or source<TAB>target per line")
    valid_src_file: str | None = knob(None, "validation sources (default: held out)")
    valid_tgt_file: str | None = knob(None, "validation targets")
    data_dir: str | None = knob(None, "where named data sets are looked up first")
    # language model (task lm): one text, cut into windows
    text_file: str | None = knob(None, "lm: your training text (plain or .gz)")
    valid_text_file: str | None = knob(None, "lm: validation text (default: the last 10%)")
    tokenizer: TokenizerKind = knob("bpe", "lm: characters, or byte-level BPE of vocab_size")
    block_size: int = knob(
        256, "lm: the context, in tokens, of each training window; items: the items a model reads"
    )
    eval_tokens: int = knob(0, "lm: validation tokens scored (0: all)")
    # sentence tasks (classify, similarity)
    valid_tsv_file: str | None = knob(
        None, "classify/similarity: validation TSV (default: held out)"
    )
    score_range: tuple[float, float] = knob((0.0, 5.0), "similarity: the lowest and highest score")
    paraphrases: bool = knob(
        False, "similarity: also learn from Multi30k's captions paired with their translations"
    )
    paraphrase_tsv: str | None = knob(
        None, "similarity: also learn from your pairs that mean the same, a<TAB>b per line"
    )
    token_dropout: float = knob(0.0, "classify: training tokens hidden as <unk> (rate)")
    init_from: str | None = knob(None, "start from this model directory's encoder and tokenizer")
    # next-item prediction (task items)
    interactions_file: str | None = knob(
        None, "items: `user item` lines in time order, or a CSV with user, item, timestamp"
    )
    item_loss: ItemLoss = knob(
        "ce", "items: softmax cross-entropy over all items, or bce with sampled negatives"
    )
    negatives: int = knob(1, "items, bce: sampled negatives per position")
    max_chars: int = knob(1000, "pairs with a longer side are skipped (and counted)")
    max_tokens_per_sentence: int = knob(128, "sentences with more subwords are skipped")
    # subwords
    vocab_size: int = knob(8000, "size of the joint BPE vocabulary to train")
    byte_fallback: bool = knob(
        False, "subwords: a character never seen in training becomes its UTF-8 bytes, not <unk>"
    )
    split_cjk: bool = knob(
        False, "subwords: each Chinese/Japanese character is its own token (no merges)"
    )
    # batching and optimisation
    max_tokens: int = knob(4096, "padded tokens (source or target, the larger) per batch")
    accumulate: int = knob(1, "batches per optimizer step")
    lr: float = knob(1e-3, "peak learning rate, reached after warmup, then 1/sqrt(step) decay")
    warmup: int = knob(800, "warmup steps (0: no warmup, decay from step 1)")
    schedule: Schedule = knob("inverse_sqrt", "after warmup: 1/sqrt(step), or cosine to min_lr")
    min_lr: float = knob(0.0, "cosine: the rate at the end of the budget (max_steps/minutes)")
    betas: tuple[float, float] = knob((0.9, 0.98), "AdamW betas")
    weight_decay: float = knob(1e-4, "AdamW weight decay")
    label_smoothing: float = knob(0.1, "probability mass spread over the vocabulary")
    clip_norm: float = knob(1.0, "gradient norm clip")
    # when to stop (whichever comes first; 0 = no limit)
    max_steps: int = knob(0, "stop after this many optimizer steps (0: no limit)")
    max_epochs: int = knob(0, "stop after this many epochs (0: no limit)")
    max_minutes: float = knob(0.0, "stop after this many minutes of training (0: no limit)")
    # evaluation and checkpoints
    eval_every: int = knob(500, "steps between validations")
    eval_sentences: int = knob(500, "validation sentences decoded for BLEU (0: all)")
    eval_beam: int = knob(1, "beam size of validation decoding (1: greedy, fast)")
    save_every: int = knob(250, "steps between resumable checkpoints")
    average_last: int = knob(0, "also write the average of the last N validated checkpoints")
    tune_alphas: tuple[float, ...] = knob(
        (),
        "translation, after training: beam-search the validation set with each of these "
        "length-penalty alphas and keep the best in best/ and averaged/ decoding.json "
        "(none: no tuning)",
    )
    seed: int = knob(1, "random seed (initialisation, batch order, dropout)")
    threads: int = knob(0, "torch threads (0: PyTorch's default)")
    precision: Precision = knob(
        "fp32",
        "bf16: the forward pass and loss in bfloat16 autocast, weights and optimizer in fp32 "
        "(a GPU, or a CPU with bf16 units); auto: bf16 only where the device has bf16 units "
        "and a quick measurement finds it faster",
    )
    log_every: int = knob(20, "steps between progress lines")

    def __post_init__(self) -> None:
        for name in ("betas", "score_range", "tune_alphas"):
            if isinstance(getattr(self, name), list):  # from JSON
                object.__setattr__(self, name, tuple(getattr(self, name)))
        _check_types(self)
        for name in (
            "vocab_size",
            "max_tokens",
            "accumulate",
            "eval_every",
            "save_every",
            "log_every",
            "max_tokens_per_sentence",
            "max_chars",
            "eval_beam",
            "block_size",
            "negatives",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in (
            "max_steps",
            "max_epochs",
            "warmup",
            "average_last",
            "eval_sentences",
            "eval_tokens",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0, got {self.threads}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not all(0 <= a <= 10 for a in self.tune_alphas):
            raise ConfigError(f"tune_alphas must be between 0 and 10, got {self.tune_alphas!r}")
        if not 0.0 <= self.token_dropout < 1.0:
            raise ConfigError(f"token_dropout must be in [0, 1), got {self.token_dropout}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.max_minutes < 0:
            raise ConfigError(f"max_minutes must be >= 0, got {self.max_minutes}")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ConfigError(f"min_lr must be in [0, lr], got {self.min_lr!r}")
        if self.schedule == "cosine" and not (self.max_steps or self.max_minutes):
            raise ConfigError("the cosine schedule needs a budget: max_steps or max_minutes")
        if self.dataset is not None and self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r} (known: {', '.join(DATASETS)})")
        if self.dataset is not None and DATASETS[self.dataset] != self.task:
            raise ConfigError(f"dataset {self.dataset} is for task {DATASETS[self.dataset]}")
        if self.task == "lm":
            if self.dataset is None and self.text_file is None:
                raise ConfigError("no training text: set dataset or text_file")
            return
        if self.task == "items":
            if self.dataset is None and self.interactions_file is None:
                raise ConfigError("no interactions: set dataset or interactions_file")
            return
        if (self.paraphrases or self.paraphrase_tsv) and self.task != "similarity":
            raise ConfigError("paraphrases are for the similarity task")
        if self.task in ("classify", "similarity"):
            if self.dataset is None and self.tsv_file is None:
                raise ConfigError(f"no training data for {self.task}: set dataset or tsv_file")
            low, high = (self.score_range + (0.0, 0.0))[:2]
            if len(self.score_range) != 2 or not low < high:
                raise ConfigError(
                    f"score_range must be two numbers, low < high: {self.score_range}"
                )
            return
        if (self.src_file is None) != (self.tgt_file is None):
            raise ConfigError("give both src_file and tgt_file, or neither")
        if (self.valid_src_file is None) != (self.valid_tgt_file is None):
            raise ConfigError("give both valid_src_file and valid_tgt_file, or neither")
        if self.dataset is None and self.src_file is None and self.tsv_file is None:
            raise ConfigError("no training data: set dataset, src_file/tgt_file or tsv_file")
        if self.src_lang == self.tgt_lang and self.dataset is not None and self.src_file is None:
            raise ConfigError("src_lang and tgt_lang must differ")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


MAX_COUNT = 2**31 - 1  # the largest length or count a DecodeConfig takes


@dataclass(frozen=True)
class DecodeConfig:
    """How outputs are chosen from the model's next-token probabilities: one config for every
    command and every strategy (qkv.search.decode)."""

    strategy: Strategy = knob("beam", "greedy, sample, or beam search")
    beam: int = knob(5, "beam size (beam search)")
    nbest: int = knob(1, "outputs per input, best first (beam search; <= beam)")
    alpha: float = knob(0.6, "length penalty exponent (0: plain log-probability)")
    penalty: Penalty = knob("gnmt", "length penalty: gnmt ((5+L)/6)^alpha or power L^alpha")
    max_len_a: float = knob(1.5, "at most a * source length + b output tokens")
    max_len_b: int = knob(10, "see max_len_a")
    min_len: int = knob(0, "at least this many output tokens before end-of-sequence")
    finish: Finish = knob(
        "heuristic",
        "beam search: a sentence is done when no live beam ending now beats its K finished "
        "ones (heuristic, as HF), or only when none could at the longest allowed output "
        "(exact; more steps)",
    )
    at_max: AtMax = knob("eos", "at the maximum length: end with eos (scored), or stop (cut)")
    temperature: float = knob(1.0, "sampling: divide log-probabilities by this")
    top_k: int = knob(0, "sampling: only the k most likely tokens (0: all)")
    top_p: float = knob(1.0, "sampling: the smallest set of top tokens with this probability")
    no_repeat_ngram: int = knob(0, "never repeat an n-gram of this size (0: allowed)")
    seed: int = knob(0, "sampling: random seed")

    def __post_init__(self) -> None:
        _check_types(self)
        # Lengths and counts past 2**31 mean nothing here, and past 2**63 they overflow the
        # tensors they become (the server's schema fuzzing sent min_len = 2**64: a 500).
        counts = ("beam", "nbest", "max_len_a", "max_len_b", "min_len", "top_k", "no_repeat_ngram")
        for name in counts:
            if not getattr(self, name) <= MAX_COUNT:  # NaN too
                raise ConfigError(f"{name} must be at most {MAX_COUNT}, got {getattr(self, name)}")
        if self.beam < 1:
            raise ConfigError(f"beam must be >= 1, got {self.beam}")
        if not 1 <= self.nbest <= (self.beam if self.strategy == "beam" else 1):
            raise ConfigError(
                f"nbest must be between 1 and the beam size ({self.beam})"
                if self.strategy == "beam"
                else f"nbest > 1 needs beam search, not {self.strategy}"
            )
        if self.max_len_a < 0 or self.max_len_b < 0 or self.min_len < 0:
            raise ConfigError("max_len_a, max_len_b and min_len must be >= 0")
        if self.max_len_a == 0 and self.max_len_b == 0:
            raise ConfigError("max_len_a and max_len_b are both 0: no output could be produced")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.no_repeat_ngram < 0:
            raise ConfigError(f"no_repeat_ngram must be >= 0, got {self.no_repeat_ngram}")
        # ((5 + L) / 6) ** alpha overflows a float past a few hundred; useful values are 0-2
        if not 0 <= self.alpha <= 10:
            raise ConfigError(f"alpha must be between 0 and 10, got {self.alpha}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be between 0 and 2**63 - 1, got {self.seed}")

    def describe(self) -> str:
        """How outputs are chosen, in a few words: "greedy", "sample (seed 0)", "beam 5 (alpha
        0.6)"."""
        if self.strategy == "sample":
            return f"sample (seed {self.seed})"
        return "greedy" if self.strategy == "greedy" else f"beam {self.beam} (alpha {self.alpha:g})"

    def replace(self, **changes: Any) -> DecodeConfig:
        return dataclasses.replace(self, **changes)
