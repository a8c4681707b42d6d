"""The training loop, for any task: AdamW with warmup and inverse-square-root decay, gradient
accumulation and clipping, progress with loss, tokens/s and ETA, periodic validation, the best
checkpoint by the task's metric, the average of the last N validated ones, resumable checkpoints,
and step / epoch / time budgets. SIGTERM or Ctrl-C (SIGINT) ends the step in progress, saves
last/ and stops (a second one stops at once): a preempted run resumes where it was told to stop.

A task (qkv.tasks) says what data it reads, which model it trains, how a batch becomes a loss and
how validation is scored; the loop knows nothing else of it.

Under torchrun (qkv/distributed.py) each process takes every N-th batch of each step's group
(so the global batch is the same whatever N is), gradients are averaged by
DistributedDataParallel, and the loss is divided by the step's tokens over all processes: N
processes take the same steps as one. Rank 0 alone validates, writes and logs; the others wait.

Output directory: best/ (the model to use), last/ (model + trainer state, for --resume),
previous/ (the last/ before it: --resume falls back to it when last/ is damaged), averaged/
(with average_last), the task's own files (e.g. tokenizer.json), train_config.json,
metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from . import checkpoint, distributed, native
from .checkpoint import CheckpointError
from .config import ConfigError, ModelConfig, TrainConfig, to_dict
from .data import DataError
from .distributed import SINGLE, World
from .models import count_parameters, from_config
from .tokenizer import Tokenizer

Log = Callable[[str], None]
BAD_STEPS_LIMIT = 5  # non-finite steps in a row before training stops


class Diverged(Exception):
    """Training stopped after non-finite losses or gradients; the message is one line."""


class Stopped(Exception):
    """Training was asked to stop by a signal and saved last/ first; `signum` says which."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class _Signals:
    """While training: SIGTERM and SIGINT only note that a stop was asked for (the loop saves
    and stops after the step in progress) and restore the old handler, so a second signal acts
    at once. Signals can only be caught on the main thread; elsewhere this does nothing."""

    CAUGHT = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def _caught(self, signum: int, frame: Any) -> None:
        self.signum = signum
        signal.signal(signum, self._old[signum])

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.CAUGHT:
                self._old[sig] = signal.signal(sig, self._caught)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Batch(Protocol):
    tokens: int  # how many positions the summed loss covers

    def to(self, device: torch.device) -> Batch: ...


class Task(Protocol):
    """What the loop needs of a task. See qkv/tasks/translation.py for one."""

    name: str  # recorded in the model directory; the commands dispatch on it
    metric: str  # the validation score that chooses best/
    maximize: bool  # whether a higher metric is better
    tokenizer: Tokenizer | None  # saved beside the weights

    def prepare(self, base: ModelConfig, out: Path, resume: bool, log: Log) -> ModelConfig:
        """Read the data (every input error surfaces here, before anything is written), make or
        reload the tokenizer in `out`; return `base` fitted to them (vocabulary, special ids)."""
        ...

    def init_model(self, model: nn.Module) -> None:
        """Anything the task sets in a freshly built model from its data (or nothing)."""
        ...

    def batches(self, epoch: int) -> list[list[int]]:
        """This epoch's training batches as example indices; the same for the same epoch."""
        ...

    def collate(self, indices: list[int]) -> Batch: ...

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """The summed training loss of a batch."""
        ...

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Validation scores, `metric` among them."""
        ...

    # Optional, to share validation among torchrun's processes: `validate_part(model, rank,
    # size)` scores process rank's share (a picklable partial result) and `validate_merge(parts)`
    # makes the scores of all of them; validate(model) is then merge([part(model, 0, 1)]). A
    # task without them validates on rank 0 alone while the others wait.

    def meta(self) -> dict[str, Any]:
        """What the model directory records about the task (languages, labels, ...)."""
        ...

    # Optional: `before_training(device, log)`, run by every process before the clock of
    # --max-minutes starts: one-time set-up the validation needs (translation: build the C++
    # kernels its decoding runs, about 40 s on a machine that has not built them yet).

    # Optional: `after_training(out, device, log)`, run once by rank 0 when the budget is spent
    # and best/ and averaged/ are written: what the task does with them (translation: tune the
    # length penalty on the validation set).


def inverse_sqrt(step: int, warmup: int) -> float:
    """Linear warmup to 1, then 1/sqrt(step) decay (Vaswani et al. 2017, section 5.3); without
    warmup, 1/sqrt(step) from the first step."""
    step = max(step, 1)
    if warmup == 0:
        return 1 / math.sqrt(step)
    return min(step / warmup, math.sqrt(warmup / step))


def cosine(progress: float, step: int, warmup: int, floor: float) -> float:
    """Linear warmup to 1, then a half cosine from 1 down to `floor` as `progress` (the used
    fraction of the budget) goes from 0 to 1 (Loshchilov & Hutter 2017, without restarts)."""
    if warmup and step < warmup:
        return step / warmup
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def learning_rate(cfg: TrainConfig, step: int, elapsed: float) -> float:
    """The rate of optimizer step `step` (from 1). The cosine's progress is the larger used
    fraction of the step and time budgets, so a minutes budget ends at min_lr on time (and
    then depends on the machine's speed, not only on the step)."""
    if cfg.schedule == "inverse_sqrt":
        return cfg.lr * inverse_sqrt(step, cfg.warmup)
    used = [step / cfg.max_steps] if cfg.max_steps else []
    if cfg.max_minutes:
        used.append(elapsed / (cfg.max_minutes * 60))
    return cfg.lr * cosine(max(used), step, cfg.warmup, cfg.min_lr / cfg.lr)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Loss and tokens/s over the steps since the last progress line, and the ETA."""

    def __init__(self) -> None:
        self.tokens, self.loss, self.since = 0, 0.0, time.monotonic()

    def add(self, loss: float, tokens: int) -> None:
        self.tokens, self.loss = self.tokens + tokens, self.loss + loss

    def line(self, t: Trainer, lr: float, n_batches: int) -> str:
        now = time.monotonic()
        tps = self.tokens / max(now - self.since, 1e-9)
        loss = self.loss / max(self.tokens, 1)
        self.tokens, self.loss, self.since = 0, 0.0, now
        cfg, remaining = t.cfg, []
        per_step = t.elapsed / max(t.step, 1)
        if cfg.max_minutes:
            remaining.append(cfg.max_minutes * 60 - t.elapsed)
        if cfg.max_steps:
            remaining.append((cfg.max_steps - t.step) * per_step)
        if cfg.max_epochs:
            left = (cfg.max_epochs - t.epoch) * n_batches - t.batch_in_epoch
            remaining.append(left / cfg.accumulate * per_step)
        eta = _fmt_time(min(remaining)) if remaining else "?"
        unit = getattr(t.task, "unit", "tok")  # what a batch's `tokens` counts
        return (
            f"step {t.step} | epoch {t.epoch + 1} "
            f"{100 * t.batch_in_epoch / n_batches:3.0f}% | loss {loss:.3f} | lr {lr:.2e} | "
            f"{tps:,.0f} {unit}/s | elapsed {_fmt_time(t.elapsed)} | ETA {eta}"
        )


class _TaskLoss(nn.Module):
    """The task's loss as one module's forward, so DistributedDataParallel sees the whole
    forward pass of any task (tasks call the model's parts, not only its forward)."""

    def __init__(self, task: Task, model: nn.Module):
        super().__init__()
        self.task, self.model = task, model

    def forward(self, batch: Batch) -> Tensor:
        return self.task.loss(self.model, batch)


def _constant_buffers() -> dict[str, bool]:
    """DDP's switch for not re-sending buffers every forward (ours are constants, the same in
    every process): its name changed in PyTorch 2.13."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    names = inspect.signature(DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in names:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


class Trainer:
    def __init__(
        self,
        task: Task,
        model_cfg: ModelConfig,
        cfg: TrainConfig,
        out: Path,
        log: Log = _stderr,
        device: torch.device | str = "cpu",
        world: World = SINGLE,
    ):
        self.task, self.cfg, self.out, self.world = task, cfg, out, world
        self.log = log if world.main else (lambda _: None)
        self.model_cfg = model_cfg
        self.device = torch.device(device)
        self.metrics_path = out / "metrics.jsonl"

    # -- set-up ------------------------------------------------------------------------------
    def _prepare_task(self, resume: bool) -> ModelConfig:
        """The task reads its data and writes its files (a tokenizer): rank 0 first, then the
        other processes read what it wrote; an input error on rank 0 stops them all."""
        world = self.world
        if world.main:
            try:
                model_cfg = self.task.prepare(self.model_cfg, self.out, resume, self.log)
            except Exception as e:
                distributed.broadcast(world, checkpoint.one_line(e))
                raise
            distributed.broadcast(world, None)
            return model_cfg
        failed = distributed.broadcast(world, None)
        if failed is not None:
            raise DataError(failed)
        return self.task.prepare(self.model_cfg, self.out, True, self.log)

    def prepare(self, resume: bool) -> None:
        cfg, out, world = self.cfg, self.out, self.world
        self.model_cfg = self._prepare_task(resume)
        torch.manual_seed(cfg.seed)
        self.model = from_config(self.model_cfg).to(self.device)
        self.task.init_model(self.model)
        self.train_module: nn.Module = _TaskLoss(self.task, self.model)
        if world.active:
            from torch.nn.parallel import DistributedDataParallel

            self.train_module = DistributedDataParallel(
                self.train_module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                # searching the graph for parameters without a gradient costs every step:
                # only when the task leaves some unused (found once, on a first batch)
                find_unused_parameters=self._has_unused_parameters(),
                **_constant_buffers(),
            )
            torch.manual_seed(cfg.seed + world.rank)  # each process its own dropout
        if cfg.init_from and not resume:
            copied = checkpoint.copy_matching(self.model, cfg.init_from)
            self.log(f"started from {cfg.init_from}: {len(copied)} tensors copied")
        # weight decay on matrices only: decaying biases and LayerNorm gains only hurts
        params = list(self.model.parameters())
        groups = [
            {"params": [p for p in params if p.dim() >= 2]},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        self.opt = torch.optim.AdamW(
            groups,
            lr=cfg.lr,
            betas=cfg.betas,
            eps=1e-9,
            weight_decay=cfg.weight_decay,
            fused=True,  # one kernel for all parameters instead of a loop of small ops
        )
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best, self.elapsed = -math.inf if self.task.maximize else math.inf, 0.0
        self.averaged: list[dict[str, Tensor]] = []
        self.bad_steps = 0  # non-finite steps in a row
        if resume:
            self._resume()
        elif world.main:
            self.metrics_path.unlink(missing_ok=True)
            checkpoint.write_text_atomic(
                out / "train_config.json",
                json.dumps({"model": to_dict(self.model_cfg), "train": to_dict(cfg)}, indent=2),
            )
        self.log(f"model: {count_parameters(self.model):,} parameters, on {self.device}")
        self.precision = self._precision()

    def _has_unused_parameters(self) -> bool:
        """Whether the task's loss leaves some parameter without a gradient: one forward and
        backward on its first batch, the random state put back after."""
        rng = torch.get_rng_state()
        batch = self._to_device(self.task.collate(self.task.batches(0)[0]))
        self.task.loss(self.model, batch).backward()
        unused = any(p.grad is None for p in self.model.parameters() if p.requires_grad)
        self.model.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)
        return unused

    def _resume(self) -> None:
        """Continue from last/, or from previous/ (the checkpoint before it) when last/ is
        missing or damaged, saying so."""
        problems = []
        for name in ("last", "previous"):
            try:
                path = self._resume_from(self.out / name)
            except CheckpointError as e:
                problems.append(str(e))
                continue
            if problems:
                self.log(f"last/ is unusable ({problems[0]}): resumed from {name}/ instead")
            self.log(f"resumed from {path}: step {self.step}, epoch {self.epoch + 1}")
            return
        raise DataError(f"{self.out}: nothing to resume from ({problems[0]})")

    def _resume_from(self, directory: Path) -> Path:
        last = checkpoint.resolve(directory)
        checkpoint.verify(last)
        state = checkpoint.load_trainer_state(last)
        if state is None:
            raise CheckpointError(f"{last}: no trainer state to resume from")
        saved_cfg, _ = checkpoint.read_config(last)
        if saved_cfg != self.model_cfg:
            raise ConfigError(f"{last}: the saved model config differs from this run's")
        checkpoint.load_weights(self.model, last, self.device)
        meta, tensors = state["json"], state["tensors"]
        try:
            checkpoint.optimizer_from_flat(self.opt, meta["optimizer"], tensors)
        except (ValueError, KeyError) as e:
            raise DataError(f"{last}: the optimizer state does not fit this model ({e})") from None
        self.step, self.epoch = meta["step"], meta["epoch"]
        self.batch_in_epoch, self.best = meta["batch_in_epoch"], meta["best"]
        self.elapsed = meta["elapsed"]
        self.bad_steps = meta.get("bad_steps", 0)
        rank = self.world.rank
        if rank == 0:
            torch.set_rng_state(tensors["rng.torch"])
        elif f"rng.torch.{rank}" in tensors:
            torch.set_rng_state(tensors[f"rng.torch.{rank}"])
        else:  # resumed with more processes than saved: a fresh stream for this one
            torch.manual_seed(self.cfg.seed + rank + 1_000_003 * self.step)
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.averaged = [
            {k[len(f"avg.{i}.") :]: v for k, v in tensors.items() if k.startswith(f"avg.{i}.")}
            for i in range(meta.get("n_averaged", 0))
        ]
        return last

    # -- checkpoints ---------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {
            "task": self.task.name,
            **self.task.meta(),
            "step": self.step,
            "train": to_dict(self.cfg),
        }

    def _save(
        self, name: str, model: nn.Module, extra: dict[str, Any], trainer=None, keep=None
    ) -> None:
        if not self.world.main:
            return
        meta = {**self._meta(), **extra}
        checkpoint.save(self.out / name, model, self.task.tokenizer, meta, trainer, keep)

    def save_last(self) -> None:
        # every process's random state (dropout), so a resume with as many continues each
        states = distributed.gather(self.world, torch.get_rng_state())
        if not self.world.main:
            return
        opt_meta, tensors = checkpoint.optimizer_to_flat(self.opt)
        tensors["rng.torch"] = states[0]
        tensors.update({f"rng.torch.{r}": st for r, st in enumerate(states) if r > 0})
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        for i, sd in enumerate(self.averaged):
            tensors.update({f"avg.{i}.{k}": v for k, v in sd.items()})
        meta = {
            "optimizer": opt_meta,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "best": self.best,
            "elapsed": self.elapsed,
            "n_averaged": len(self.averaged),
            "bad_steps": self.bad_steps,
        }
        # the checkpoint it replaces stays as previous/, for a last/ damaged after the fact
        trainer = {"json": meta, "tensors": tensors}
        self._save("last", self.model, {}, trainer, keep=self.out / "previous")

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        """The task's metrics (shared among the processes when the task can split them, else
        on rank 0 while the others wait), best/ if improved."""
        world, task = self.world, self.task
        scores: dict[str, float] | None = None
        shared = world.active and hasattr(task, "validate_part")
        self.model.eval()
        with torch.no_grad():
            if shared:  # each process scores its share; rank 0 merges
                parts = distributed.gather(
                    world, task.validate_part(self.model, world.rank, world.size)
                )
                scores = task.validate_merge(parts) if world.main else None
            elif world.main:
                scores = task.validate(self.model)
        self.model.train()
        if world.main:
            row = {"step": self.step, "epoch": self.epoch + 1, "minutes": self.elapsed / 60}
            with self.metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({**row, **scores}) + "\n")
        scores = distributed.broadcast(self.world, scores)
        assert scores is not None
        score = scores[self.task.metric]
        improved = score > self.best if self.task.maximize else score < self.best
        if improved:
            self.best = score
            self._save("best", self.model, scores)
        if self.cfg.average_last and self.world.main:
            state = self.model.state_dict()
            self.averaged.append(
                {k: v.detach().clone() for k, v in state.items() if "sinusoids" not in k}
            )
            del self.averaged[: -self.cfg.average_last]
        shown = ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
        self.log(f"validation at step {self.step}: {shown}{' (best)' if improved else ''}")

    # -- the loop ------------------------------------------------------------------------------
    def _step(self, group: list[list[int]], lr: float) -> tuple[float, int] | None:
        """One optimizer step over a group of batches: (summed loss, tokens), over every
        process; None, and no update, when a loss or the gradient is not finite (NaN or inf).
        Under torchrun this process takes batches rank, rank + N, ... of the group."""
        world = self.world
        share = [(idx, 1.0) for idx in group[world.rank :: world.size]]
        # every process runs as many micro-batches (DDP needs it): when the group does not
        # divide evenly, some run one more that counts 0 (an --accumulate that is a multiple
        # of the process count wastes nothing)
        share += [(group[0], 0.0)] * (-(-len(group) // world.size) - len(share))
        batches = [(self._to_device(self.task.collate(idx)), w) for idx, w in share]
        local_tokens = sum(b.tokens * w for b, w in batches)
        (tokens,) = distributed.sum_floats(world, [local_tokens], self.device)
        for g in self.opt.param_groups:
            g["lr"] = lr
        total, finite = 0.0, True
        forward = self.train_module
        for i, (batch, weight) in enumerate(batches):
            # DDP averages gradients over the processes once, at the group's last backward
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if last or not world.active else forward.no_sync()
            with sync:
                with self._autocast():
                    loss = forward(batch)
                value = loss.item() * weight
                if not math.isfinite(value) and not world.active:
                    finite = False
                    break  # alone, nothing waits for this backward
                finite = finite and math.isfinite(value)
                try:  # the mean over every token of the step, all processes together
                    (loss * (weight * world.size) / tokens).backward()  # alone: loss * 1.0 / tokens
                except RuntimeError as e:
                    if world.active:  # DDP's all-reduce: a peer died
                        raise distributed.broken(e) from None
                    raise
            total += value
        if world.active:
            total, bad = distributed.sum_floats(world, [total, float(not finite)], self.device)
            finite = bad == 0
        if finite:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_norm)
            finite = math.isfinite(norm.item())
        if finite:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return (total, int(tokens)) if finite else None

    def _to_device(self, batch: Batch) -> Batch:
        """A batch on the training device; to a GPU through pinned memory, copied without
        waiting (the copy overlaps what the GPU is still doing)."""
        if self.device.type != "cuda":
            return batch.to(self.device)
        moved = {
            f.name: v.pin_memory().to(self.device, non_blocking=True)
            for f in dataclasses.fields(batch)  # type: ignore[arg-type]
            if torch.is_tensor(v := getattr(batch, f.name))
        }
        return dataclasses.replace(batch, **moved)  # type: ignore[type-var]

    def _precision(self) -> str:
        """fp32 or bf16 (qkv.precision): "auto" times a feed-forward product of a batch's size
        in both; rank 0's answer holds for every process, so all compute alike."""
        from .precision import resolve, why

        asked, m = self.cfg.precision, self.model_cfg
        chosen = resolve(asked, self.device, self.cfg.max_tokens, m.d_model, m.d_ff, training=True)
        chosen = distributed.broadcast(self.world, chosen)
        if asked != "fp32":
            self.log(f"precision: {why(asked, chosen, self.device)}")
        return chosen

    def _autocast(self):
        """bf16 autocast of the forward pass and loss when the precision is bf16."""
        on = self.precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on)

    def run(self, on_step: Callable[[int], None] | None = None) -> None:
        with _Signals() as signals:
            self._run(on_step, signals)

    def _run(self, on_step: Callable[[int], None] | None, signals: _Signals) -> None:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.model.train()
        if self.device.type == "cpu":  # qkv's C++ kernels for dropout and the loss, built (about
            native.masks()  # 40 s on a machine that has none yet) and checked before the clock
            native.losses()  # starts, not inside the first step of a --max-minutes budget
        before = getattr(self.task, "before_training", None)
        if before is not None:
            before(self.device, self.log)
        t0, elapsed0 = time.monotonic(), self.elapsed
        progress = Progress()
        stop = self._budget_spent()  # a resumed run that had already finished
        if stop:
            self.log("the step or time budget is already spent: nothing to train (raise it)")
        while not stop:
            if cfg.max_epochs and self.epoch >= cfg.max_epochs:
                break
            batches = self.task.batches(self.epoch)
            while self.batch_in_epoch < len(batches):
                group = batches[self.batch_in_epoch : self.batch_in_epoch + cfg.accumulate]
                lr = learning_rate(cfg, self.step + 1, self.elapsed)
                result = self._step(group, lr)
                self.step += 1
                self.batch_in_epoch += len(group)
                self.elapsed = elapsed0 + time.monotonic() - t0
                if result is None:
                    self._skipped()
                else:
                    self.bad_steps = 0
                    progress.add(*result)
                if self.step % cfg.log_every == 0:
                    self.log(progress.line(self, lr, len(batches)))
                if on_step is not None:
                    on_step(self.step)
                signum = signals.signum
                if self.world.active:  # rank 0's clock decides, so all stop at the same step;
                    # a signal any process caught stops them all after this step
                    mine = self.elapsed if self.world.main else 0.0
                    self.elapsed, asked = distributed.sum_floats(
                        self.world, [mine, float(signum)], self.device
                    )
                    signum = signum or (signal.SIGTERM if asked else 0)
                if signum:
                    self._stop_on_signal(signum)
                stop = self._should_stop(len(batches))
                if self.step % cfg.eval_every == 0 or stop:
                    self.validate()
                if self.step % cfg.save_every == 0 or stop or self.step % cfg.eval_every == 0:
                    self.save_last()
                if stop:
                    break
            else:
                self.epoch += 1
                self.batch_in_epoch = 0
        self.finish()

    def _stop_on_signal(self, signum: int) -> None:
        """Save last/ (no validation: a preempted job may have seconds) and stop."""
        self.save_last()
        name = signal.Signals(signum).name
        raise Stopped(
            signum,
            f"{name}: stopped after step {self.step} and saved {self.out / 'last'}; "
            "continue with --resume",
        )

    def _skipped(self) -> None:
        """A step with a non-finite loss or gradient was skipped: say so; stop after
        BAD_STEPS_LIMIT in a row, keeping the last good checkpoint."""
        self.bad_steps += 1
        self.log(
            f"step {self.step}: non-finite loss or gradient, update skipped "
            f"({self.bad_steps} in a row)"
        )
        if self.bad_steps >= BAD_STEPS_LIMIT:
            raise Diverged(
                f"training diverged: {self.bad_steps} steps in a row had a non-finite loss or "
                f"gradient (step {self.step}); the last good checkpoint is {self.out / 'last'}: "
                "lower --lr (or raise --warmup) and train again"
            )

    def _steps_spent(self) -> bool:
        return bool(self.cfg.max_steps and self.step >= self.cfg.max_steps)

    def _time_spent(self) -> bool:
        return bool(self.cfg.max_minutes and self.elapsed >= self.cfg.max_minutes * 60)

    def _budget_spent(self) -> bool:
        return self._steps_spent() or self._time_spent()

    def _should_stop(self, n_batches: int) -> bool:
        cfg = self.cfg
        if self._steps_spent():
            return True
        if self._time_spent():
            self.log(f"time budget of {cfg.max_minutes:g} minutes reached")
            return True
        return bool(
            cfg.max_epochs and self.batch_in_epoch >= n_batches and self.epoch + 1 >= cfg.max_epochs
        )

    def finish(self) -> None:
        if self.cfg.average_last and len(self.averaged) > 1 and self.world.main:
            averaged = from_config(self.model_cfg).to(self.device)
            averaged.load_state_dict(checkpoint.average(self.averaged), strict=False)
            self._save("averaged", averaged, {})
            self.log(f"wrote the average of the last {len(self.averaged)} checkpoints to averaged/")
        after = getattr(self.task, "after_training", None)
        if after is not None and self.world.main:
            after(self.out, self.device, self.log)
        self.log(
            f"done: step {self.step}, best validation {self.task.metric} {self.best:.3f} "
            f"(model in {self.out / 'best'})"
        )


def train(
    task: Task,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    device: torch.device | str = "cpu",
    log: Log = _stderr,
    on_step: Callable[[int], None] | None = None,
    world: World = SINGLE,
) -> Trainer:
    """Train `task`'s model (shape `model_cfg`, fitted to the data by the task) as `cfg` says;
    `world`: this process's place among torchrun's (qkv.distributed)."""
    trainer = Trainer(task, model_cfg, cfg, Path(out), log, device, world)
    trainer.prepare(resume)
    trainer.run(on_step)
    return trainer
