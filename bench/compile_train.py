"""torch.compile of the training step on this machine: the multi30k-de-en model's loss module
(as the loop, and DistributedDataParallel, call it) on four batches of three shapes, eager and
compiled, seconds per forward + backward (the first compiled ones include compiling).

    .venv/bin/python bench/compile_train.py
"""

from __future__ import annotations

import time

import torch

from qkv.data import Example, collate
from qkv.loss import seq2seq_loss
from qkv.models import from_config
from qkv.presets import PRESETS
from qkv.train import _TaskLoss


class _Translation:
    def loss(self, model, batch):
        return seq2seq_loss(model, batch, 0.1)


def main() -> None:
    torch.manual_seed(0)
    shape, _ = PRESETS["multi30k-de-en"]
    cfg = shape.replace(vocab_size=8000, dropout=0.0)
    model = from_config(cfg)

    def batch(n: int, s: int, t: int):
        rows = [
            Example(torch.randint(4, 8000, (s,)).tolist(), torch.randint(4, 8000, (t,)).tolist())
            for _ in range(n)
        ]
        return collate(rows, cfg.pad_id, cfg.bos_id, cfg.eos_id)

    batches = [batch(90, 20, 22), batch(80, 24, 25), batch(100, 18, 19), batch(90, 20, 22)]
    for name, step in (
        ("eager", _TaskLoss(_Translation(), model)),
        ("compiled", torch.compile(_TaskLoss(_Translation(), model))),
    ):
        seconds = []
        for b in batches:
            start = time.perf_counter()
            step(b).backward()
            seconds.append(time.perf_counter() - start)
        print(f"{name}: " + ", ".join(f"{s:.2f} s" for s in seconds))


if __name__ == "__main__":
    main()
