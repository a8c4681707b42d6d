"""Training on several processes with PyTorch's own engine: torchrun starts them, this module
joins them into one process group, and the training loop wraps its model in
DistributedDataParallel (qkv/train.py).

    torchrun --nproc_per_node 2 -m qkv train --preset multi30k-de-en --out runs/de-en
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_endpoint host:29500 -m qkv train ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in each process's environment; without them (a
plain `qkv train`) there is one process and nothing here does anything. Backends: nccl on CUDA
(each process on GPU LOCAL_RANK), gloo on the CPU. Every collective has a timeout
(`$QKV_DIST_TIMEOUT` seconds, default 600): a process that dies makes the others stop with a
clear message instead of waiting forever.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .config import ConfigError


class DistributedError(RuntimeError):
    """The process group failed: a process died, or a collective timed out."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The process that writes files and logs (rank 0)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


SINGLE = World()


def _number(name: str, default: str, kind=int):
    text = os.environ.get(name, default)
    try:
        value = kind(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"${name} must be a number >= 0, got {text!r}")
    return value


def from_env() -> World:
    """The world torchrun describes in the environment (one process when it says nothing)."""
    size = _number("WORLD_SIZE", "1")
    if size <= 1:
        return SINGLE
    return World(_number("RANK", "0"), size, _number("LOCAL_RANK", "0"))


def timeout() -> datetime.timedelta:
    seconds = _number("QKV_DIST_TIMEOUT", "600", float)
    if seconds == 0:
        raise ConfigError("$QKV_DIST_TIMEOUT must be > 0 seconds")
    return datetime.timedelta(seconds=seconds)


_joined = False  # this process has joined a process group (init)


def init(world: World, device: torch.device) -> torch.device:
    """Join the process group (gloo on the CPU, nccl on CUDA); the device this process trains
    on (CUDA: the GPU of its local rank)."""
    if not world.active:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=world.rank, world_size=world.size, timeout=timeout())
    global _joined
    _joined = True
    return device


def exit_if_joined(code: int) -> None:
    """End a process that joined a process group now, with `code`, skipping the interpreter's
    and C++'s teardown. Why: DistributedDataParallel keeps gloo's process group, and its
    threads, alive inside PyTorch after destroy_process_group (seen with 2.13: the threads are
    still there after the wrapper is gone and collected), and their teardown at exit now and
    then aborted a finished two-process run ("terminate called without an active exception",
    SIGABRT, exit -6; once in CI, once in 90 runs of one test's command) after it had saved
    everything. Every file qkv writes is closed by then;
    only the standard streams need flushing. A process that never joined returns normally."""
    if not _joined:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def close(world: World, finished: bool = False) -> None:
    """Leave the process group. `finished` (every rank completed): first wait for the others,
    since a gloo peer that tears down while another is still finishing can abort that one at
    exit ("terminate called without an active exception", seen once in the two-process resume
    test). The wait alone did not end that abort (it came from gloo's threads outliving the
    group, not from a peer still running): exit_if_joined did. After an error nobody waits:
    the peers may be gone."""
    if world.active and dist.is_initialized():
        if finished:  # (a peer already gone: nothing left to wait for)
            with contextlib.suppress(RuntimeError, dist.DistBackendError):
                dist.barrier()
        dist.destroy_process_group()


def sum_floats(world: World, values: list[float], device: torch.device) -> list[float]:
    """Each value summed over the processes (in float64: counts stay exact)."""
    if not world.active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    _checked(dist.all_reduce, t)
    return t.tolist()


def broadcast(world: World, obj: Any) -> Any:
    """Rank 0's `obj`, on every process."""
    if not world.active:
        return obj
    box = [obj]
    _checked(dist.broadcast_object_list, box, src=0)
    return box[0]


def gather(world: World, obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order, on every process."""
    if not world.active:
        return [obj]
    out: list[Any] = [None] * world.size
    _checked(dist.all_gather_object, out, obj)
    return out


def barrier(world: World) -> None:
    if world.active:
        _checked(dist.barrier)


def broken(e: BaseException) -> DistributedError:
    """The one-line error for a collective that failed: a peer died, or the timeout passed."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return DistributedError(
        f"the process group broke (another process died or stalled past "
        f"{timeout().total_seconds():g} s): {first}"
    )


def _checked(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistBackendError) as e:
        raise broken(e) from None
