"""Micro-batching: concurrent requests share one forward pass instead of queueing one by one.

    batcher = MicroBatcher(lambda reqs: generate_batch(model, reqs, stop_ids, pad_id),  # veritune.infer.decode
                           max_batch_size=32, max_wait_ms=10)
    batcher.start()
    future = batcher.submit(GenerationRequest(prompt_ids=[...], max_new_tokens=24))
    completion = future.result()          # a Completion
    batcher.stop()                        # finishes what was queued, then the worker exits

A `MicroBatcher` runs one worker thread. It waits for the first pending item, then keeps
collecting for at most `max_wait_ms` or until `max_batch_size` items are in hand, and hands
the whole list to its batch function; each item's future gets its own result (or the
batch's exception). The server uses one for generation and one for retrieval (all queries
of a batch embedded and searched in one call).

Static batching: requests that arrive while a batch runs form the next one. Nothing but the
standard library is needed here, so the GPU engine and its benchmark (bench/serve_throughput.py)
import it without the HTTP stack.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)


class BatcherStopped(RuntimeError):
    """The batcher is stopping or stopped and takes no new work."""


class QueueFull(RuntimeError):
    """More requests are pending than the batcher accepts; the client should retry later."""


class MicroBatcher:
    """Collects submitted items into batches for `batch_fn(items) -> results` on one worker thread."""

    def __init__(
        self,
        batch_fn: Callable[[list[Any]], Sequence[Any]],
        max_batch_size: int,
        max_wait_ms: float,
        max_pending: int = 0,
        name: str = "batcher",
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.batch_fn, self.max_batch_size, self.max_wait_s = batch_fn, max_batch_size, max_wait_ms / 1000.0
        self.max_pending, self.name = max_pending, name
        self._queue: queue.Queue[tuple[Any, Future] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._accepting = False
        # Held across "accepting?" and the enqueue, and by stop() around closing: every item
        # is then either queued before the stop sentinel (and drained) or refused at once.
        self._lock = threading.Lock()
        self.batch_sizes: list[int] = []  # one entry per batch run: what the server reports and tests check
        self.on_batch: Callable[[int, float], None] | None = None  # (size, seconds) after each batch

    def start(self) -> MicroBatcher:
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def submit(self, item: Any) -> Future:
        """Queue `item`; raises BatcherStopped at once once stop() has begun (a request that
        raced the shutdown would otherwise land after the final drain and never resolve)."""
        with self._lock:
            if not self._accepting:
                raise BatcherStopped(f"{self.name} is not running")
            if self.max_pending and self._queue.qsize() >= self.max_pending:
                raise QueueFull(f"{self.name}: {self.max_pending} requests already pending")
            future: Future = Future()
            self._queue.put((item, future))
        return future

    def pending(self) -> int:
        return self._queue.qsize()

    def batch_stats(self) -> dict:
        sizes = self.batch_sizes
        return {
            "batches": len(sizes),
            "max_batch_size_seen": max(sizes, default=0),
            "mean_batch_size": round(sum(sizes) / len(sizes), 3) if sizes else 0.0,
        }

    def stop(self, timeout: float | None = None) -> None:
        """Take no new items, finish those already queued, then end the worker."""
        with self._lock:
            was_accepting, self._accepting = self._accepting, False
            if was_accepting:  # one sentinel, after every accepted item
                self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def _collect(self) -> tuple[list[tuple[Any, Future]], bool]:
        """Block for the first item, then gather more until the batch is full or the wait is over."""
        first = self._queue.get()
        if first is None:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                entry = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is None:
                return batch, True
            batch.append(entry)
        return batch, False

    def _run(self) -> None:
        done = False
        while not done:
            batch, done = self._collect()
            if done:  # drain what arrived before stop() in full batches
                while True:
                    try:
                        entry = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if entry is not None:
                        batch.append(entry)
                for start in range(0, len(batch), self.max_batch_size):
                    self._run_batch(batch[start : start + self.max_batch_size])
                break
            self._run_batch(batch)

    def _run_batch(self, batch: list[tuple[Any, Future]]) -> None:
        live = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
        if not live:
            return
        started = time.perf_counter()
        try:
            results = self.batch_fn([item for item, _ in live])
        except BaseException as e:  # the batch failed: every member hears why, the worker goes on
            log.exception("%s: batch of %d failed", self.name, len(live))
            for _, fut in live:
                fut.set_exception(e)
            return
        self.batch_sizes.append(len(live))
        if self.on_batch is not None:
            self.on_batch(len(live), time.perf_counter() - started)
        for (_, fut), result in zip(live, results):
            fut.set_result(result)
