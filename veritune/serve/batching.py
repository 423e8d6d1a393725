"""Micro-batching: concurrent requests share one forward pass instead of queueing one by one.

    batcher = MicroBatcher(lambda reqs: generate_batch(model, reqs, stop_ids), max_batch_size=32, max_wait_ms=10)
    batcher.start()
    future = batcher.submit(GenerationRequest(prompt_ids=[...], max_new_tokens=24))
    completion = future.result()          # a Completion
    batcher.stop()                        # finishes what was queued, then the worker exits

A `MicroBatcher` runs one worker thread. It waits for the first pending item, then keeps
collecting for at most `max_wait_ms` or until `max_batch_size` items are in hand, and hands
the whole list to its batch function; each item's future gets its own result (or the
batch's exception). The server uses one for generation and one for retrieval (all queries
of a batch embedded and searched in one call).

`generate_batch` is a greedy decoding loop over a left-padded batch with a KV cache, with
what `model.generate` lacks for serving: each request has its own `max_new_tokens`, its
own stop, a per-token callback (streaming) and a cancel flag (a client that timed out or
went away stops costing compute at the next step). Finished rows leave the batch (and the
KV cache) at once. Static batching otherwise: requests that arrive while a batch runs form
the next one.

Only torch is needed here, so the GPU benchmark (bench/serve_throughput.py) imports it
without the HTTP stack.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

log = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    on_token: Callable[[int], None] | None = None  # called from the worker thread after each new token
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Allowed next tokens (`mask()`, None: any) and the token picked (`consume`), e.g. a
    # `veritune.infer.constraints.ToolCallConstraint`; called from the worker thread.
    constraint: Any = None


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]  # generated tokens, the stop token excluded
    finish_reason: str  # "stop" (a stop token), "length" (max_new_tokens) or "cancelled"
    prompt_tokens: int
    batch_size: int  # how many requests shared this request's forward passes
    stop_token_id: int | None = None  # the stop token that ended it (finish_reason "stop")


class BatcherStopped(RuntimeError):
    """The batcher is stopping or stopped and takes no new work."""


class QueueFull(RuntimeError):
    """More requests are pending than the batcher accepts; the client should retry later."""


class MicroBatcher:
    """Collects submitted items into batches for `batch_fn(items) -> results` on one worker thread."""

    def __init__(self, batch_fn: Callable[[list[Any]], Sequence[Any]], max_batch_size: int, max_wait_ms: float,
                 max_pending: int = 0, name: str = "batcher"):
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

    def start(self) -> "MicroBatcher":
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
        return {"batches": len(sizes), "max_batch_size_seen": max(sizes, default=0),
                "mean_batch_size": round(sum(sizes) / len(sizes), 3) if sizes else 0.0}

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
                    self._run_batch(batch[start:start + self.max_batch_size])
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


def apply_mask(logits: torch.Tensor, allowed: torch.Tensor) -> None:
    """Set the logits of disallowed tokens to -inf in place (`allowed`: a bool mask over token
    ids; ids past its end are disallowed, entries past the logits' end ignored)."""
    n = logits.shape[-1]
    keep = torch.zeros(n, dtype=torch.bool, device=logits.device)
    m = min(n, allowed.shape[0])
    keep[:m] = allowed[:m].to(logits.device)
    logits.masked_fill_(~keep, float("-inf"))


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask of `rows`, padded on the left so every row ends at the last column."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate_batch(model, requests: Sequence[GenerationRequest], stop_ids: Sequence[int], pad_id: int) -> list[Completion]:
    """Greedy completions of `requests`, decoded together in one batch.

    Left padding keeps each row's newest token in the last column; positions count only real
    tokens (cumulative attention mask), so a padded row decodes exactly as it would alone.
    A row that finishes (stop token, its own max_new_tokens, cancelled) leaves the batch and
    the KV cache at once, so the rest decode at the cost of the rows still running.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    n = len(requests)
    input_ids, attention_mask = left_pad([r.prompt_ids for r in requests], pad_id, device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    generated: list[list[int]] = [[] for _ in range(n)]
    reasons: list[str | None] = [None] * n
    stopped_by: list[int | None] = [None] * n
    live = list(range(n))  # request index of each row still in the batch
    cache = DynamicCache(config=model.config)  # filled in place by each forward
    # transformers renamed `past_key_values` to `cache` (5.2x); pass whichever this version takes.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    while live:
        # logits_to_keep=1: only the last position's logits are needed, not the prompt's.
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=True, logits_to_keep=1, **{cache_arg: cache})
        logits = out.logits[:, -1, :]
        for row, i in enumerate(live):
            constraint = requests[i].constraint
            allowed = constraint.mask() if constraint is not None else None
            if allowed is not None:
                apply_mask(logits[row], allowed)
        next_ids = logits.argmax(dim=-1)
        is_stop = torch.isin(next_ids, stops).tolist()
        tokens = next_ids.tolist()
        keep = []
        for row, i in enumerate(live):
            r = requests[i]
            if r.constraint is not None:
                r.constraint.consume(tokens[row])
            if r.cancelled.is_set():
                reasons[i] = "cancelled"
            elif is_stop[row]:
                reasons[i], stopped_by[i] = "stop", tokens[row]
            else:
                generated[i].append(tokens[row])
                if r.on_token is not None:
                    r.on_token(tokens[row])
                if len(generated[i]) >= r.max_new_tokens:
                    reasons[i] = "length"
            if reasons[i] is None:
                keep.append(row)
        if len(keep) < len(live):
            if not keep:
                break
            rows = torch.tensor(keep, dtype=torch.long, device=device)
            cache.batch_select_indices(rows)
            next_ids, attention_mask, position_ids = next_ids[rows], attention_mask[rows], position_ids[rows]
            live = [live[row] for row in keep]
        input_ids = next_ids.unsqueeze(-1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(live), 1))], dim=-1)
        position_ids = position_ids[:, -1:] + 1
    return [Completion(token_ids=generated[i], finish_reason=reasons[i] or "length",
                       prompt_tokens=len(r.prompt_ids), batch_size=n, stop_token_id=stopped_by[i])
            for i, r in enumerate(requests)]
