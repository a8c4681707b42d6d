"""Tasks: what a model is trained for. Each module here is one task, implementing the loop's
`qkv.train.Task` protocol (data, model shape, loss, validation metric, saved files).

Adding a task: one new module, a `Task` literal in config.py, and a case in `task_for`.
"""

from __future__ import annotations

from ..config import TrainConfig
from ..train import Task


def task_for(cfg: TrainConfig) -> Task:
    """The task a training config names."""
    match cfg.task:
        case "translation":
            from .translation import Translation

            return Translation(cfg)
        case "lm":
            from .lm import LanguageModel

            return LanguageModel(cfg)
    raise AssertionError(cfg.task)  # TrainConfig validated it
