"""Translation: an encoder-decoder trained on parallel text (a named data set or the user's
files) with one joint BPE vocabulary, scored on validation by loss and greedy (or beam) BLEU;
after training, the length penalty tuned on the validation set (qkv.tuning)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import checkpoint, native, tuning
from ..config import DecodeConfig, ModelConfig, TrainConfig
from ..data import (
    PARALLEL_SPLITS,
    DataError,
    Example,
    Pair,
    Seq2SeqBatch,
    clean_pairs,
    collate,
    parallel,
    read_parallel,
    read_tsv,
    token_batches,
)
from ..evaluate import bleu
from ..loss import seq2seq_loss
from ..models import device_of
from ..tokenizer import Subwords, Tokenizer
from ..translate import Translator


@dataclass
class Corpus:
    train: list[Pair]
    valid: list[Pair]
    skipped_blank: int
    skipped_long: int


RECURRENT = ("gru", "gru-attention")  # qkv.recurrent's baselines
MIN_TRAIN_PAIRS = 100  # below this a run would only memorise, for however long it is given


def load_corpus(cfg: TrainConfig) -> Corpus:
    """Training and validation pairs as the config names them; DataError on bad input."""
    if cfg.tsv_file:
        train = read_tsv(cfg.tsv_file)
    elif cfg.src_file and cfg.tgt_file:
        train = read_parallel(cfg.src_file, cfg.tgt_file)
    else:
        assert cfg.dataset is not None  # TrainConfig: a data set or files
        train = parallel(cfg.dataset, "train", cfg.src_lang, cfg.tgt_lang, cfg.data_dir)
    if cfg.valid_src_file and cfg.valid_tgt_file:
        valid = read_parallel(cfg.valid_src_file, cfg.valid_tgt_file)
    elif cfg.dataset and not (cfg.tsv_file or cfg.src_file):
        split = PARALLEL_SPLITS[cfg.dataset][0]
        valid = parallel(cfg.dataset, split, cfg.src_lang, cfg.tgt_lang, cfg.data_dir)
    else:  # hold out a deterministic slice of the user's data
        n = min(1000, max(1, len(train) // 50))
        train, valid = train[:-n] if len(train) > n else train, train[-n:]
    kept = clean_pairs(train, cfg.max_chars)
    if len(kept.pairs) < MIN_TRAIN_PAIRS:
        source = cfg.tsv_file or cfg.src_file or "the training data"
        raise DataError(
            f"{source}: {len(kept.pairs)} usable training pair(s) ({kept.blank} blank, "
            f"{kept.too_long} too long skipped): too few to learn a translation from "
            f"(at least {MIN_TRAIN_PAIRS})"
        )
    return Corpus(kept.pairs, clean_pairs(valid, cfg.max_chars).pairs, kept.blank, kept.too_long)


def encode_pairs(
    tok: Tokenizer, pairs: list[Pair], max_tokens: int | None = None
) -> tuple[list[Example], int]:
    """Pairs as token ids; pairs with an empty side or a side of max_tokens or more dropped and
    counted."""
    src = tok.encode_batch([s for s, _ in pairs])
    tgt = tok.encode_target_batch([t for _, t in pairs])
    examples = [Example(s, t) for s, t in zip(src, tgt, strict=True)]
    limit = max_tokens or float("inf")
    kept = [e for e in examples if 0 < len(e.src) < limit and 0 < len(e.tgt) < limit]
    return kept, len(examples) - len(kept)


class Translation:
    """The translation task for the training loop."""

    name = "translation"
    metric = "valid_bleu"
    maximize = True

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.tokenizer: Tokenizer | None = None

    def prepare(self, base: ModelConfig, out: Path, resume: bool, log) -> ModelConfig:
        cfg = self.cfg
        corpus = load_corpus(cfg)  # all input errors surface here, before anything is written
        tok_path = out / Subwords.FILE
        if resume and tok_path.is_file():
            tok = Subwords.load(tok_path)
        else:
            texts = [s for s, _ in corpus.train] + [t for _, t in corpus.train]
            tok = Subwords.train(
                texts, cfg.vocab_size, byte_fallback=cfg.byte_fallback, split_cjk=cfg.split_cjk
            )
            out.mkdir(parents=True, exist_ok=True)
            checkpoint.write_text_atomic(tok_path, tok.to_str())
        self.tokenizer = tok
        self.train_set, too_long = encode_pairs(tok, corpus.train, cfg.max_tokens_per_sentence)
        self.valid_pairs = corpus.valid
        self.valid_set, _ = encode_pairs(tok, corpus.valid, cfg.max_tokens_per_sentence)
        log(
            f"data: {len(self.train_set):,} training pairs, {len(self.valid_pairs):,} validation; "
            f"skipped {corpus.skipped_blank} blank, {corpus.skipped_long + too_long} too long; "
            f"vocabulary {tok.vocab_size:,}"
        )
        self.model_cfg = base.replace(
            # the Transformer, unless a recurrent baseline was asked for
            arch=base.arch if base.arch in RECURRENT else "encoder-decoder",
            vocab_size=tok.vocab_size,
            tgt_vocab_size=None,
            share_embeddings=True,
            max_len=max(base.max_len, cfg.max_tokens_per_sentence + 2),
            **tok.special_ids,
        )
        return self.model_cfg

    def init_model(self, model: nn.Module) -> None:
        pass

    def batches(self, epoch: int) -> list[list[int]]:
        return token_batches(self.train_set, self.cfg.max_tokens, self.cfg.seed, epoch)

    def _collate(self, examples: list[Example]) -> Seq2SeqBatch:
        mc = self.model_cfg
        return collate(examples, mc.pad_id, mc.bos_id, mc.eos_id)

    def collate(self, indices: list[int]) -> Seq2SeqBatch:
        return self._collate([self.train_set[i] for i in indices])

    def loss(self, model: nn.Module, batch: Seq2SeqBatch) -> Tensor:
        return seq2seq_loss(model, batch, self.cfg.label_smoothing)

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Validation loss per target token, and BLEU of the first eval_sentences."""
        return self.validate_merge([self.validate_part(model, 0, 1)])

    def validate_part(self, model: nn.Module, rank: int, size: int) -> dict[str, Any]:
        """Process `rank` of `size`'s share of validation: every size-th batch's summed loss
        and tokens, every size-th BLEU sentence's hypothesis (with its index)."""
        device = device_of(model)
        total, n = 0.0, 0
        batches = token_batches(self.valid_set, self.cfg.max_tokens, 0, 0, shuffle=False)
        for idx in batches[rank::size]:
            batch = self._collate([self.valid_set[i] for i in idx]).to(device)
            total, n = total + seq2seq_loss(model, batch, 0.0).item(), n + batch.tokens
        pairs = self.valid_pairs[: self.cfg.eval_sentences or None]
        mine = list(range(rank, len(pairs), size))
        assert self.tokenizer is not None
        beam = self.cfg.eval_beam
        decoding = DecodeConfig(strategy="greedy" if beam == 1 else "beam", beam=beam)
        hyps = Translator(model, self.tokenizer).translate_best(
            [pairs[i][0] for i in mine], decoding
        )
        return {"loss": total, "tokens": n, "hyps": dict(zip(mine, hyps, strict=True))}

    def validate_merge(self, parts: list[dict[str, Any]]) -> dict[str, float]:
        pairs = self.valid_pairs[: self.cfg.eval_sentences or None]
        hyps = {i: h for part in parts for i, h in part["hyps"].items()}
        total, n = sum(p["loss"] for p in parts), sum(p["tokens"] for p in parts)
        return {
            "valid_loss": total / max(n, 1),
            "valid_bleu": bleu(
                [hyps[i] for i in range(len(pairs))], [t for _, t in pairs], self.cfg.tgt_lang
            ),
        }

    def before_training(self, device: torch.device, log) -> None:
        """Build (or load) qkv's C++ kernels, which validation's decoding runs on a CPU, before
        the clock starts: the first build takes about 40 s, a third of a 2-minute budget."""
        if device.type == "cpu":
            native.kernel()

    def after_training(self, out: Path, device: torch.device, log) -> None:
        """The length penalty of best/ and averaged/, tuned on the validation set."""
        alphas = self.cfg.tune_alphas
        pairs = self.valid_pairs[: tuning.SENTENCES]
        if not alphas or not pairs:
            return
        for name in ("best", "averaged"):
            if not (out / name / "model.safetensors").is_file():
                continue
            log(f"tuning the length penalty of {name}/ on {len(pairs):,} validation sentences")
            tuned = tuning.tune_model_dir(
                out / name, pairs, self.cfg.tgt_lang, alphas, "validation", device, log
            )
            log(f"{name}/{tuning.FILE}: alpha {tuned.alpha:g} (BLEU {tuned.bleu[tuned.alpha]:.2f})")

    def meta(self) -> dict[str, Any]:
        return {
            "src_lang": self.cfg.src_lang,
            "tgt_lang": self.cfg.tgt_lang,
            "dataset": self.cfg.dataset,
        }
