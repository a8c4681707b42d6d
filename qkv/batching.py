"""Dynamic batching: requests that arrive together are answered by one batched call.

A server's requests come one at a time, but a Transformer decodes a batch of 32 sentences in
little more time than one (the weights are read once per step, not once per sentence). The
`Batcher` keeps a queue; its worker thread takes the oldest request, waits at most `max_wait_s`
for more with the same key (the same decoding settings: only those can share a decode), up to
`max_items` inputs, and makes one call for all of them. Each request gets back its own slice.

It runs on its own thread, so the models never block the server's event loop, and it should be the
only thread that runs PyTorch at all: `call(fn)` runs anything else (loading a model) there too.
(With two Python threads running parallel ops, PyTorch's OpenMP threads outnumber the cores and
libgomp stops spinning between regions: every matmul pays a wake-up, 2-3x slower on small
batches.) The queue is bounded: past `max_queue` waiting requests `submit`
raises `QueueFull` at once (the server answers 503) rather than letting latency grow without end.
A request whose future was cancelled while it waited (its client timed out) is dropped unrun.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

# (key, all inputs of the gathered requests, in order) -> one output per input
RunFn = Callable[[Hashable, list[Any]], Sequence[Any]]
# (key, requests gathered, inputs, seconds the call took): what the server's metrics record
OnBatch = Callable[[Hashable, int, int, float], None]


class QueueFull(Exception):
    """More requests are waiting than the queue allows: come back later."""


class _Call:
    """The key of a `call`: a function to run on the worker thread, alone."""

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn


@dataclass
class _Job:
    key: Hashable
    inputs: list[Any]
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """Gathers concurrent requests with equal keys into one `run(key, inputs)` call.

    max_items: the most inputs one call gets (a request with more still runs, alone).
    max_wait_s: how long the oldest request may wait for company; 0 with max_requests=1 turns
    batching off (each request its own call), which is what the benchmark compares against.
    """

    def __init__(
        self,
        run: RunFn,
        *,
        max_items: int = 64,
        max_wait_s: float = 0.005,
        max_queue: int = 256,
        max_requests: int | None = None,
        on_batch: OnBatch | None = None,
        name: str = "batcher",
    ):
        self.run, self.on_batch = run, on_batch
        self.max_items, self.max_wait_s, self.max_queue = max_items, max_wait_s, max_queue
        self.max_requests = max_requests
        self._queue: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        """Requests waiting (not yet running)."""
        return len(self._queue)

    def submit(self, key: Hashable, inputs: list[Any]) -> Future:
        """Queue one request; its future gets the list of outputs, one per input."""
        job = _Job(key, list(inputs))
        with self._cv:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting")
            self._queue.append(job)
            self._cv.notify()
        return job.future

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run fn() on the worker thread (in queue order, never batched); its future gets the
        result. Not bounded by max_queue."""
        job = _Job(_Call(fn), [None])
        with self._cv:
            self._queue.append(job)
            self._cv.notify()
        return job.future

    def close(self, timeout: float | None = None) -> None:
        """Stop after the requests already queued have run."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)

    def _gather(self) -> list[_Job] | None:
        """The next batch: the oldest request and, within its wait, later ones with its key."""
        with self._cv:
            while not self._queue:
                if self._closed:
                    return None
                self._cv.wait()
            first = self._queue.popleft()
            batch, items = [first], len(first.inputs)
            deadline = first.arrived + self.max_wait_s
            while items < self.max_items and (
                self.max_requests is None or len(batch) < self.max_requests
            ):
                fits = next(
                    (
                        j
                        for j in self._queue
                        if j.key == first.key and items + len(j.inputs) <= self.max_items
                    ),
                    None,
                )
                if fits is not None:
                    self._queue.remove(fits)
                    batch.append(fits)
                    items += len(fits.inputs)
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    break
                self._cv.wait(left)
            return batch

    def _work(self) -> None:
        while (batch := self._gather()) is not None:
            # a cancelled future (its client gave up) is not run; the others are now running
            batch = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            key, inputs = batch[0].key, [x for j in batch for x in j.inputs]
            if isinstance(key, _Call):  # alone, by construction
                try:
                    batch[0].future.set_result(key.fn())
                except BaseException as e:
                    batch[0].future.set_exception(e)
                continue
            start = time.perf_counter()
            try:
                outputs = list(self.run(key, inputs))
                if len(outputs) != len(inputs):
                    raise RuntimeError(f"{len(outputs)} outputs for {len(inputs)} inputs")
            except BaseException as e:  # every waiting request hears of it; the worker goes on
                for j in batch:
                    j.future.set_exception(e)
                continue
            if self.on_batch is not None:
                self.on_batch(key, len(batch), len(inputs), time.perf_counter() - start)
            at = 0
            for j in batch:
                j.future.set_result(outputs[at : at + len(j.inputs)])
                at += len(j.inputs)
