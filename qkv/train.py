"""The training loop for translation: token-count batches, label-smoothed cross-entropy, AdamW
with warmup and inverse-square-root decay, clipping, accumulation, validation loss and BLEU,
best and resumable checkpoints, progress with tokens/s and ETA, metrics in JSONL.

Output directory: best/ (the model to use), last/ (model + trainer state, for --resume),
tokenizer.json, train_config.json, metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .config import ConfigError, ModelConfig, TrainConfig, from_dict, to_dict
from .data import (
    DataError,
    Example,
    Pair,
    clean_pairs,
    multi30k,
    read_parallel,
    read_tsv,
    token_batches,
)
from .evaluate import bleu
from .models import EncoderDecoder, count_parameters
from .tokenizer import BOS, EOS, PAD, Subwords
from .translate import DecodeOptions, Translator

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Corpus:
    train: list[Pair]
    valid: list[Pair]
    skipped_blank: int
    skipped_long: int


def load_corpus(cfg: TrainConfig) -> Corpus:
    """Training and validation pairs as the config names them; DataError on bad input."""
    if cfg.tsv_file:
        train = read_tsv(cfg.tsv_file)
    elif cfg.src_file and cfg.tgt_file:
        train = read_parallel(cfg.src_file, cfg.tgt_file)
    else:
        train = multi30k("train", cfg.src_lang, cfg.tgt_lang, cfg.data_dir)
    if cfg.valid_src_file and cfg.valid_tgt_file:
        valid = read_parallel(cfg.valid_src_file, cfg.valid_tgt_file)
    elif cfg.dataset and not (cfg.tsv_file or cfg.src_file):
        valid = multi30k("val", cfg.src_lang, cfg.tgt_lang, cfg.data_dir)
    else:  # hold out a deterministic slice of the user's data
        n = min(1000, max(1, len(train) // 50))
        train, valid = train[:-n] if len(train) > n else train, train[-n:]
    kept = clean_pairs(train, cfg.max_chars)
    if not kept.pairs:
        raise DataError("no usable training pairs (all blank or too long)")
    return Corpus(kept.pairs, clean_pairs(valid, cfg.max_chars).pairs, kept.blank, kept.too_long)


def encode_pairs(tok: Subwords, pairs: list[Pair], max_tokens: int) -> tuple[list[Example], int]:
    src = tok.encode_batch([s for s, _ in pairs])
    tgt = tok.encode_batch([t for _, t in pairs])
    examples = [Example(s, t) for s, t in zip(src, tgt, strict=True)]
    kept = [e for e in examples if 0 < len(e.src) < max_tokens and 0 < len(e.tgt) < max_tokens]
    return kept, len(examples) - len(kept)


def collate(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> src (B, S) ending in eos, tgt_in (B, T) from bos, tgt_out (B, T) ending in eos."""
    b = len(examples)
    s = max(len(e.src) for e in examples) + 1
    t = max(len(e.tgt) for e in examples) + 1
    src = torch.full((b, s), PAD, dtype=torch.long)
    tgt_in = torch.full((b, t), PAD, dtype=torch.long)
    tgt_out = torch.full((b, t), PAD, dtype=torch.long)
    for i, e in enumerate(examples):
        src[i, : len(e.src) + 1] = torch.tensor(e.src + [EOS])
        tgt_in[i, : len(e.tgt) + 1] = torch.tensor([BOS] + e.tgt)
        tgt_out[i, : len(e.tgt) + 1] = torch.tensor(e.tgt + [EOS])
    return src, tgt_in, tgt_out


class SmoothedCrossEntropy(torch.autograd.Function):
    """Summed label-smoothed cross-entropy of logits (N, V) against targets (N,): the target
    distribution puts 1 - eps on the right token and eps / V on every token (Szegedy et al.
    2016), as F.cross_entropy(..., label_smoothing=eps, reduction="sum") computes it.

    Written out because the gradient has a closed form, softmax(logits) - target distribution,
    which takes fewer passes over the (N, V) logits than autograd through log_softmax:
    1.5x faster or more, forward + backward, on this project's CPU (bench/loss_speed.py).
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
        log_probs = logits.log_softmax(dim=-1)  # (N, V)
        right = log_probs.gather(1, target[:, None]).sum()
        # -sum_j q_j log p_j, with q = (1 - eps) on the right token + eps / V on every token
        loss = -(1 - eps) * right - eps / logits.shape[-1] * log_probs.sum()
        ctx.save_for_backward(log_probs, target)
        ctx.eps = eps
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        log_probs, target = ctx.saved_tensors
        eps = ctx.eps
        grad = log_probs.exp().sub_(eps / log_probs.shape[-1])  # p - eps / V
        right = grad.new_full((len(target), 1), -(1 - eps))
        grad.scatter_add_(1, target[:, None], right)  # and - (1 - eps) on the right token
        if grad_out.item() != 1.0:  # the usual case, loss.backward(), skips a pass
            grad.mul_(grad_out)
        return grad, None, None


def smoothed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """Summed label-smoothed cross-entropy; see SmoothedCrossEntropy."""
    return SmoothedCrossEntropy.apply(logits, target, eps)


def loss_sum(
    model: EncoderDecoder,
    src: torch.Tensor,
    tgt_in: torch.Tensor,
    tgt_out: torch.Tensor,
    label_smoothing: float,
) -> tuple[torch.Tensor, int]:
    """Summed label-smoothed cross-entropy over real target tokens, and their count.

    The vocabulary projection (the biggest matmul) runs on real tokens only, not on padding.
    """
    memory, mask = model.encode(src)
    h = model.decoder(tgt_in, memory, mask)  # (B, T, D)
    keep = tgt_out != PAD
    logits = model.lm_head(h[keep])  # (N, V), N real target tokens
    loss = smoothed_cross_entropy(logits.float(), tgt_out[keep], label_smoothing)
    return loss, int(keep.sum())


def inverse_sqrt(step: int, warmup: int) -> float:
    """Linear warmup to 1, then 1/sqrt(step) decay (Vaswani et al. 2017, section 5.3)."""
    step = max(step, 1)
    if warmup == 0:
        return 1.0
    return min(step / warmup, math.sqrt(warmup / step))


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Trainer:
    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, out: Path, log: Log = _stderr):
        self.cfg, self.out, self.log = cfg, out, log
        self.model_cfg = model_cfg
        self.metrics_path = out / "metrics.jsonl"

    # -- set-up ------------------------------------------------------------------------------
    def prepare(self, resume: bool) -> None:
        cfg, out = self.cfg, self.out
        corpus = load_corpus(cfg)  # all input errors surface here, before anything is written
        tok_path = out / "tokenizer.json"
        if resume and tok_path.is_file():
            self.tok = Subwords.load(tok_path)
        else:
            texts = [s for s, _ in corpus.train] + [t for _, t in corpus.train]
            self.tok = Subwords.train(texts, cfg.vocab_size)
            out.mkdir(parents=True, exist_ok=True)
            checkpoint.write_text_atomic(tok_path, self.tok.tok.to_str())
        self.train_set, too_long = encode_pairs(self.tok, corpus.train, cfg.max_tokens_per_sentence)
        self.valid_pairs = corpus.valid
        self.valid_set, _ = encode_pairs(self.tok, corpus.valid, cfg.max_tokens_per_sentence)
        self.log(
            f"data: {len(self.train_set):,} training pairs, {len(self.valid_pairs):,} validation; "
            f"skipped {corpus.skipped_blank} blank, {corpus.skipped_long + too_long} too long"
        )
        v = self.tok.vocab_size
        self.model_cfg = self.model_cfg.replace(
            vocab_size=v,
            tgt_vocab_size=None,
            share_embeddings=True,
            max_len=max(self.model_cfg.max_len, cfg.max_tokens_per_sentence + 2),
            pad_id=PAD,
            bos_id=BOS,
            eos_id=EOS,
        )
        torch.manual_seed(cfg.seed)
        self.model = EncoderDecoder(self.model_cfg)
        self.opt = torch.optim.AdamW(
            self.model.parameters(),
            lr=cfg.lr,
            betas=cfg.betas,
            eps=1e-9,
            weight_decay=cfg.weight_decay,
            fused=True,  # one kernel for all parameters instead of a loop of small ops
        )
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best_bleu, self.elapsed = -1.0, 0.0
        self.averaged: list[dict[str, torch.Tensor]] = []
        if resume:
            self._resume()
        else:
            self.metrics_path.unlink(missing_ok=True)
            checkpoint.write_text_atomic(
                out / "train_config.json",
                json.dumps({"model": to_dict(self.model_cfg), "train": to_dict(cfg)}, indent=2),
            )
        self.log(f"model: {count_parameters(self.model):,} parameters, vocabulary {v:,}")

    def _resume(self) -> None:
        last = self.out / "last"
        try:
            last = checkpoint.resolve(last)
        except checkpoint.CheckpointError:
            raise DataError(f"{self.out}: nothing to resume (no last/ checkpoint)") from None
        state = checkpoint.load_trainer_state(last)
        if state is None:
            raise DataError(f"{last}: no trainer state to resume from")
        saved_cfg, _ = checkpoint.read_config(last)
        if saved_cfg != self.model_cfg:
            raise ConfigError(f"{last}: the saved model config differs from this run's")
        from safetensors.torch import load_model

        load_model(self.model, str(last / "model.safetensors"))
        meta, tensors = state["json"], state["tensors"]
        checkpoint.optimizer_from_flat(self.opt, meta["optimizer"], tensors)
        self.step, self.epoch = meta["step"], meta["epoch"]
        self.batch_in_epoch, self.best_bleu = meta["batch_in_epoch"], meta["best_bleu"]
        self.elapsed = meta["elapsed"]
        torch.set_rng_state(tensors["rng.torch"])
        n_avg = meta.get("n_averaged", 0)
        self.averaged = [
            {k[len(f"avg.{i}.") :]: v for k, v in tensors.items() if k.startswith(f"avg.{i}.")}
            for i in range(n_avg)
        ]
        self.log(f"resumed from {last}: step {self.step}, epoch {self.epoch + 1}")

    # -- checkpoints ---------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {
            "src_lang": self.cfg.src_lang,
            "tgt_lang": self.cfg.tgt_lang,
            "step": self.step,
            "train": to_dict(self.cfg),
        }

    def save_last(self) -> None:
        opt_meta, tensors = checkpoint.optimizer_to_flat(self.opt)
        tensors["rng.torch"] = torch.get_rng_state()
        for i, sd in enumerate(self.averaged):
            tensors.update({f"avg.{i}.{k}": v for k, v in sd.items()})
        meta = {
            "optimizer": opt_meta,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "best_bleu": self.best_bleu,
            "elapsed": self.elapsed,
            "n_averaged": len(self.averaged),
        }
        checkpoint.save(
            self.out / "last",
            self.model,
            self.tok,
            self._meta(),
            trainer={"json": meta, "tensors": tensors},
        )

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        total, n = 0.0, 0
        for idx in token_batches(self.valid_set, self.cfg.max_tokens, 0, 0, shuffle=False):
            loss, count = loss_sum(self.model, *collate([self.valid_set[i] for i in idx]), 0.0)
            total, n = total + loss.item(), n + count
        pairs = self.valid_pairs[: self.cfg.eval_sentences or None]
        translator = Translator(self.model, self.tok)
        opts = DecodeOptions(beam=self.cfg.eval_beam, greedy=self.cfg.eval_beam == 1)
        hyps = translator.translate_best([s for s, _ in pairs], opts)
        self.model.train()
        return {"valid_loss": total / max(n, 1), "valid_bleu": bleu(hyps, [t for _, t in pairs])}

    def _record(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def _eval_and_save(self) -> None:
        scores = self.evaluate()
        row = {"step": self.step, "epoch": self.epoch + 1, "minutes": self.elapsed / 60, **scores}
        self._record(row)
        improved = scores["valid_bleu"] > self.best_bleu
        if improved:
            self.best_bleu = scores["valid_bleu"]
            checkpoint.save(self.out / "best", self.model, self.tok, {**self._meta(), **scores})
        if self.cfg.average_last:
            self.averaged.append(
                {
                    k: v.detach().clone()
                    for k, v in self.model.state_dict().items()
                    if "sinusoids" not in k
                }
            )
            del self.averaged[: -self.cfg.average_last]
        self.log(
            f"eval step {self.step}: valid loss {scores['valid_loss']:.3f}, "
            f"BLEU {scores['valid_bleu']:.2f}{' (best)' if improved else ''}"
        )

    # -- the loop ------------------------------------------------------------------------------
    def run(self, on_step: Callable[[int], None] | None = None) -> None:
        cfg, model = self.cfg, self.model
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        model.train()
        sched = lambda s: cfg.lr * inverse_sqrt(s, cfg.warmup)  # noqa: E731
        t0, elapsed0 = time.monotonic(), self.elapsed
        window_tokens, window_t, window_loss, window_n = 0, time.monotonic(), 0.0, 0
        stop = False
        while not stop:
            if cfg.max_epochs and self.epoch >= cfg.max_epochs:
                break
            batches = token_batches(self.train_set, cfg.max_tokens, cfg.seed, self.epoch)
            while self.batch_in_epoch < len(batches):
                group = batches[self.batch_in_epoch : self.batch_in_epoch + cfg.accumulate]
                tokens = sum(len(self.train_set[i].tgt) + 1 for idx in group for i in idx)
                for g in self.opt.param_groups:
                    g["lr"] = sched(self.step + 1)
                step_loss = 0.0
                for idx in group:
                    loss, _ = loss_sum(
                        model, *collate([self.train_set[i] for i in idx]), cfg.label_smoothing
                    )
                    (loss / tokens).backward()  # mean over every target token of the step
                    step_loss += loss.item()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                self.step += 1
                self.batch_in_epoch += len(group)
                self.elapsed = elapsed0 + time.monotonic() - t0
                window_tokens += tokens
                window_loss, window_n = window_loss + step_loss, window_n + tokens
                if self.step % cfg.log_every == 0:
                    now = time.monotonic()
                    tps = window_tokens / max(now - window_t, 1e-9)
                    self._progress(window_loss / window_n, sched(self.step), tps, len(batches))
                    window_tokens, window_t, window_loss, window_n = 0, now, 0.0, 0
                if on_step is not None:
                    on_step(self.step)
                stop = self._should_stop(len(batches))
                if self.step % cfg.eval_every == 0 or stop:
                    self._eval_and_save()
                if self.step % cfg.save_every == 0 or stop or self.step % cfg.eval_every == 0:
                    self.save_last()
                if stop:
                    break
            else:
                self.epoch += 1
                self.batch_in_epoch = 0
        self.finish()

    def _should_stop(self, n_batches: int) -> bool:
        cfg = self.cfg
        if cfg.max_steps and self.step >= cfg.max_steps:
            return True
        if cfg.max_minutes and self.elapsed >= cfg.max_minutes * 60:
            self.log(f"time budget of {cfg.max_minutes:g} minutes reached")
            return True
        return bool(
            cfg.max_epochs and self.batch_in_epoch >= n_batches and self.epoch + 1 >= cfg.max_epochs
        )

    def _progress(self, loss: float, lr: float, tps: float, n_batches: int) -> None:
        cfg = self.cfg
        remaining = []
        if cfg.max_minutes:
            remaining.append(cfg.max_minutes * 60 - self.elapsed)
        per_step = self.elapsed / max(self.step, 1)
        if cfg.max_steps:
            remaining.append((cfg.max_steps - self.step) * per_step)
        if cfg.max_epochs:
            left = (cfg.max_epochs - self.epoch) * n_batches - self.batch_in_epoch
            remaining.append(left / cfg.accumulate * per_step)
        eta = _fmt_time(min(remaining)) if remaining else "?"
        self.log(
            f"step {self.step} | epoch {self.epoch + 1} "
            f"{100 * self.batch_in_epoch / n_batches:3.0f}% | loss {loss:.3f} | lr {lr:.2e} | "
            f"{tps:,.0f} tgt tok/s | elapsed {_fmt_time(self.elapsed)} | ETA {eta}"
        )

    def finish(self) -> None:
        if self.cfg.average_last and len(self.averaged) > 1:
            avg = {
                k: sum(sd[k].float() for sd in self.averaged) / len(self.averaged)
                for k in self.averaged[0]
            }
            averaged = EncoderDecoder(self.model_cfg)
            averaged.load_state_dict(avg, strict=False)
            checkpoint.save(self.out / "averaged", averaged, self.tok, self._meta())
            self.log(f"wrote the average of the last {len(self.averaged)} checkpoints to averaged/")
        self.log(
            f"done: step {self.step}, best validation BLEU {self.best_bleu:.2f} "
            f"(model in {self.out / 'best'})"
        )


def train(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    log: Log = _stderr,
    on_step: Callable[[int], None] | None = None,
) -> Trainer:
    trainer = Trainer(model_cfg, cfg, Path(out), log)
    trainer.prepare(resume)
    trainer.run(on_step)
    return trainer


def read_run_config(path: Path) -> tuple[ModelConfig, TrainConfig]:
    """The configs a run was started with (its train_config.json)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model, train = data["model"], data["train"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a qkv run config ({e})") from None
    src = str(path)
    return from_dict(ModelConfig, model, source=src), from_dict(TrainConfig, train, source=src)
