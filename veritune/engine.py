"""Continuous batching over a static KV cache: the built-in serving engine on a GPU.

    engine = ContinuousBatchingEngine(model, stop_ids, max_batch=64, max_len=2048).start()
    future = engine.submit(GenerationRequest(prompt_ids=[...], max_new_tokens=128))
    completion = future.result()          # a veritune.batching.Completion
    engine.stop()                         # finishes what was accepted, then the worker exits

One worker thread owns the model. Between two decode steps it admits waiting requests (up
to `max_batch` in flight): their prompts are prefilled together, packed without padding
through the linear layers (`prefill_tokens` prompt tokens per forward at most), each one's
keys and values written into its own slot of a cache allocated once,
`[layers][slots, kv_heads, max_len, head_dim]`, and each gets its first token from that
forward. A decode step then runs every slot in flight as one batch of one token each, each
at its own position: attention reads a slot's cache up to its own length (a boolean mask from
the positions). A request leaves the batch the step it finishes (stop token, its own
`max_new_tokens`, cancelled), and its slot goes to the next one waiting, so requests join and
leave between any two steps; nothing is recomputed and no cache is moved.

The forward is written here over the weights of a transformers `LlamaForCausalLM` (RMSNorm,
RoPE from the model's own rotary tables, grouped-query attention over the cache, SwiGLU),
which makes the decode step a fixed sequence of kernels on fixed buffers. On CUDA each step
is captured once as a CUDA graph per (batch bucket, length bucket) and replayed, so a step
of 32 layers costs a few launches instead of ~600: the eager step of an 8B model at batch
64 spends most of its time launching kernels, not reading weights. Buckets: batches of
1, 2, 4, 8, 16, 32, 64, 128 (slots are handed out lowest first, so the batch is the highest
slot in use, rounded up), lengths in multiples of 256. Graphs are captured on first use
(`warmup` captures them ahead). Greedy picking and the grammar masks of constrained tool
calls run outside the graph on its logits, per request, as in `generate_batch`.

The same code runs eagerly on a CPU (the tests), where the server keeps `generate_batch`.
"""

from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from veritune.batching import BatcherStopped, Completion, GenerationRequest, QueueFull, apply_mask

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LENGTH_STEP = 256  # length buckets: multiples of this (a step reads at most this much masked cache per slot)


def supported(model) -> str | None:
    """None if the engine can run `model`, else why not (then the server keeps `generate_batch`)."""
    cfg = model.config
    if getattr(cfg, "model_type", None) != "llama":
        return f"model_type {getattr(cfg, 'model_type', None)!r} is not llama"
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return "attention or MLP biases"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r}"
    return None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers' LlamaRMSNorm: statistics in float32, scaled in the input's dtype.
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    x = x + delta
    return x, _rms_norm(x, weight, eps)


def _rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    return _rope(q, cos, sin), _rope(k, cos, sin)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


EAGER_OPS = {"rms": _rms_norm, "add_rms": _add_rms_norm, "rope_qk": _rope_qk, "silu_mul": _silu_mul}


def fused_ops() -> dict:
    """The element-wise pieces compiled into one kernel each (Triton, through torch.compile;
    shapes dynamic, so one compilation serves every batch and prompt length). In the eager form
    RMSNorm alone is seven kernels: ~1,400 launches a step on 32 layers, milliseconds of a
    decode step that reads the weights in ~4 ms."""
    return {name: torch.compile(fn, dynamic=True, fullgraph=True) for name, fn in EAGER_OPS.items()}


@dataclass
class _Layer:
    ln1: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    ln2: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


@dataclass
class _Running:
    request: GenerationRequest
    future: Future
    slot: int
    position: int  # where the next token's key and value go (= tokens in the cache)
    token: int  # the last token picked: the next step's input
    generated: list[int] = field(default_factory=list)
    first_token_at: float | None = None


class ContinuousBatchingEngine:
    """Continuous batching of greedy generation over a static KV cache (see the module docstring).

    Same interface as `veritune.batching.MicroBatcher` for the server: `start`, `submit`,
    `pending`, `stop`, `batch_stats`; requests and completions are those of `generate_batch`.
    """

    def __init__(self, model, stop_ids: Sequence[int], max_batch: int = 64, max_len: int = 2048,
                 prefill_tokens: int = 8192, cuda_graphs: bool = True, max_pending: int = 0,
                 name: str = "engine", fuse: bool = True):
        why = supported(model)
        if why is not None:
            raise ValueError(f"the continuous-batching engine runs bias-free Llama models with SwiGLU; this one has {why}")
        if max_batch < 1 or max_batch > BATCH_BUCKETS[-1]:
            raise ValueError(f"max_batch must be in 1..{BATCH_BUCKETS[-1]}, got {max_batch}")
        if prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be >= 1, got {prefill_tokens}")
        cfg = model.config
        self.model, self.name = model, name
        self.max_batch, self.prefill_tokens, self.max_pending = max_batch, prefill_tokens, max_pending
        self.stop_ids = sorted(set(int(s) for s in stop_ids))
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.ops = EAGER_OPS
        if fuse and self.device.type == "cuda":
            self.ops = self._try_fused()
        self.eps = cfg.rms_norm_eps
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.group = self.n_heads // self.n_kv
        self.scale = self.head_dim ** -0.5
        # Lengths are bucketed in steps of LENGTH_STEP; the cache holds whole buckets.
        positions = int(getattr(cfg, "max_position_embeddings", max_len))
        self.max_len = min(-(-max_len // LENGTH_STEP) * LENGTH_STEP, -(-positions // LENGTH_STEP) * LENGTH_STEP)
        self.positions = min(positions, self.max_len)  # a request's prompt + new tokens must fit this

        inner = model.model
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        self.lm_head = model.lm_head.weight
        self.layers = [_Layer(l.input_layernorm.weight, l.self_attn.q_proj.weight, l.self_attn.k_proj.weight,
                              l.self_attn.v_proj.weight, l.self_attn.o_proj.weight, l.post_attention_layernorm.weight,
                              l.mlp.gate_proj.weight, l.mlp.up_proj.weight, l.mlp.down_proj.weight)
                       for l in inner.layers]
        with torch.inference_mode():
            # The model's own rotary tables (llama3 scaling, attention scaling), in its dtype, as its forward uses them.
            probe = torch.zeros(1, 1, self.head_dim, device=self.device, dtype=self.dtype)
            cos, sin = inner.rotary_emb(probe, torch.arange(self.max_len, device=self.device)[None])
            self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()
            shape = (max_batch, self.n_kv, self.max_len, self.head_dim)
            self.k_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
            self.v_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
            # Static inputs of the decode step; the row of (slot s, kv head h) at position p in a
            # layer's flattened cache is (s * n_kv + h) * max_len + p.
            self.in_tokens = torch.zeros(max_batch, dtype=torch.long, device=self.device)
            self.in_positions = torch.zeros(max_batch, dtype=torch.long, device=self.device)
            self.row_base = ((torch.arange(max_batch, device=self.device)[:, None] * self.n_kv
                              + torch.arange(self.n_kv, device=self.device)[None]) * self.max_len)
            self.t_index = torch.arange(self.max_len, device=self.device)
        self._host_tokens = torch.zeros(max_batch, dtype=torch.long, pin_memory=self.device.type == "cuda")
        self._host_positions = torch.zeros(max_batch, dtype=torch.long, pin_memory=self.device.type == "cuda")
        self.cache_bytes = 2 * sum(t.numel() * t.element_size() for t in self.k_cache)
        self._graphs: dict[tuple[int, int], tuple] = {}
        self._pool = None

        self._queue: queue.Queue = queue.Queue()
        self._waiting: list[tuple[GenerationRequest, Future]] = []  # taken from the queue, not yet admitted
        self._running: dict[int, _Running] = {}
        self._free = list(range(max_batch))  # a heap: lowest slot first keeps the batch bucket small
        self._lock = threading.Lock()
        self._accepting = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run
        self.step_rows = 0  # requests summed over decode steps (mean batch = step_rows / steps)
        self.max_in_flight = 0
        self.prefills = 0
        self.on_batch = None  # (size, seconds) after each decode step, as MicroBatcher reports batches

    def _try_fused(self) -> dict:
        """The compiled element-wise ops, checked against the eager ones on this device; the
        eager ones where compilation is unavailable (no Triton) or disagrees."""
        try:
            ops = fused_ops()
            x = torch.randn(3, 64, device=self.device, dtype=self.dtype)
            w = torch.randn(64, device=self.device, dtype=self.dtype)
            cos, sin = torch.randn(2, 3, 1, 16, device=self.device, dtype=self.dtype)
            q, k = x.view(3, 4, 16), x[:, :32].reshape(3, 2, 16)
            checks = [(ops["rms"](x, w, 1e-5), _rms_norm(x, w, 1e-5)),
                      (ops["add_rms"](x, x, w, 1e-5)[1], _add_rms_norm(x, x, w, 1e-5)[1]),
                      (ops["rope_qk"](q, k, cos, sin)[1], _rope_qk(q, k, cos, sin)[1]),
                      (ops["silu_mul"](x, x), _silu_mul(x, x))]
            tol = 1e-2 if self.dtype == torch.bfloat16 else 1e-4
            if all(torch.allclose(a.float(), b.float(), rtol=tol, atol=tol) for a, b in checks):
                return ops
            log.warning("%s: compiled element-wise ops disagree with eager ones; running eager", self.name)
        except Exception as e:  # no Triton / no compiler on this machine
            log.warning("%s: element-wise ops not compiled (%s: %s); running eager", self.name, type(e).__name__, e)
        return EAGER_OPS

    # ------------------------------------------------------------------ the forward passes

    def _decode_forward(self, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One token for slots [0, batch): inputs in `in_tokens` / `in_positions`; attention over
        the first `length` positions of each slot's cache, masked past the slot's own position."""
        ops, eps = self.ops, self.eps
        tokens, positions = self.in_tokens[:batch], self.in_positions[:batch]
        x = F.embedding(tokens, self.embed)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [batch, 1, head_dim]
        visible = self.t_index[:length][None] <= positions[:, None]
        # One additive mask for all layers ([batch, 1, 1, length]; SDPA would convert a boolean one per call).
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill_(
            ~visible, float("-inf"))[:, None, None, :]
        rows = (self.row_base[:batch] + positions[:, None]).reshape(-1)
        d, hkv = self.head_dim, self.n_kv
        h = ops["rms"](x, self.layers[0].ln1, eps)
        for i, w in enumerate(self.layers):
            q, k = ops["rope_qk"](F.linear(h, w.q).view(batch, self.n_heads, d),
                                  F.linear(h, w.k).view(batch, hkv, d), cos, sin)
            v = F.linear(h, w.v).view(batch, hkv, d)
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc.view(-1, d).index_copy_(0, rows, k.reshape(-1, d))
            vc.view(-1, d).index_copy_(0, rows, v.reshape(-1, d))
            # The query heads of one kv head side by side as its "query length": GQA without copies.
            o = F.scaled_dot_product_attention(q.view(batch, hkv, self.group, d), kc[:batch, :, :length],
                                               vc[:batch, :, :length], attn_mask=mask, scale=self.scale)
            x, h = ops["add_rms"](x, F.linear(o.reshape(batch, -1), w.o), w.ln2, eps)
            down = F.linear(ops["silu_mul"](F.linear(h, w.gate), F.linear(h, w.up)), w.down)
            nxt = self.layers[i + 1].ln1 if i + 1 < len(self.layers) else self.norm
            x, h = ops["add_rms"](x, down, nxt, eps)
        logits = F.linear(h, self.lm_head)
        return logits, logits.argmax(-1)

    def _prefill_forward(self, prompts: Sequence[Sequence[int]], slots: Sequence[int]) -> torch.Tensor:
        """Prompts into their slots' cache; the logits of each prompt's last position [n, vocab].
        Linear layers run on the prompts packed end to end; attention runs per prompt, right-padded
        into one causal batch (a real position never sees the padding after it)."""
        dev, d, hkv = self.device, self.head_dim, self.n_kv
        n = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=dev)
        width = int(lengths.max())
        tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=dev)
        seq = torch.repeat_interleave(torch.arange(n, device=dev), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        positions = torch.arange(len(tokens), device=dev) - starts[seq]
        slot_of = torch.tensor(list(slots), dtype=torch.long, device=dev)[seq]
        rows = ((slot_of[:, None] * hkv + torch.arange(hkv, device=dev)[None]) * self.max_len
                + positions[:, None]).reshape(-1)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        ops, eps = self.ops, self.eps
        x = F.embedding(tokens, self.embed)
        h = ops["rms"](x, self.layers[0].ln1, eps)
        for i, w in enumerate(self.layers):
            q, k = ops["rope_qk"](F.linear(h, w.q).view(-1, self.n_heads, d), F.linear(h, w.k).view(-1, hkv, d),
                                  cos, sin)
            v = F.linear(h, w.v).view(-1, hkv, d)
            self.k_cache[i].view(-1, d).index_copy_(0, rows, k.reshape(-1, d))
            self.v_cache[i].view(-1, d).index_copy_(0, rows, v.reshape(-1, d))
            if n == 1:
                qp, kp, vp = q[None], k[None], v[None]
            else:
                qp = q.new_zeros(n, width, self.n_heads, d)
                kp = k.new_zeros(n, width, hkv, d)
                vp = v.new_zeros(n, width, hkv, d)
                qp[seq, positions], kp[seq, positions], vp[seq, positions] = q, k, v
            kp = kp.repeat_interleave(self.group, dim=2)  # kv head j serves query heads j*group ... (j+1)*group-1
            vp = vp.repeat_interleave(self.group, dim=2)
            o = F.scaled_dot_product_attention(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2),
                                               is_causal=True, scale=self.scale).transpose(1, 2)
            o = o[0] if n == 1 else o[seq, positions]
            x, h = ops["add_rms"](x, F.linear(o.reshape(len(tokens), -1), w.o), w.ln2, eps)
            down = F.linear(ops["silu_mul"](F.linear(h, w.gate), F.linear(h, w.up)), w.down)
            if i + 1 < len(self.layers):
                x, h = ops["add_rms"](x, down, self.layers[i + 1].ln1, eps)
            else:
                x = x + down
        last = torch.cumsum(lengths, 0) - 1
        return F.linear(ops["rms"](x[last], self.norm, eps), self.lm_head)

    def _step(self, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.cuda_graphs:
            return self._decode_forward(batch, length)
        key = (batch, length)
        if key not in self._graphs:
            self._capture(batch, length)
        graph, logits, picked = self._graphs[key]
        graph.replay()
        return logits, picked

    def _capture(self, batch: int, length: int) -> None:
        started = time.perf_counter()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            # Warm-up runs rewrite the same cache entries with the same values: harmless.
            for _ in range(2):
                self._decode_forward(batch, length)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits, picked = self._decode_forward(batch, length)
        self._graphs[(batch, length)] = (graph, logits, picked)
        log.info("%s: captured the decode step for batch %d, length %d (%.2f s)", self.name, batch, length,
                 time.perf_counter() - started)

    @torch.inference_mode()
    def warmup(self, batches: Sequence[int] = BATCH_BUCKETS, lengths: Sequence[int] = (LENGTH_STEP,)) -> None:
        """Capture the decode graphs for these buckets now (else each is captured on first use).
        Call before `start`: the worker thread owns the model once it runs."""
        if not self.cuda_graphs:
            return
        for b in batches:
            if b <= self.max_batch:
                for t in lengths:
                    key = (self._batch_bucket(b), self._length_bucket(t))
                    if key not in self._graphs:
                        self._capture(*key)
        torch.cuda.synchronize()

    def _batch_bucket(self, n: int) -> int:
        return min(next(b for b in BATCH_BUCKETS if b >= n), self.max_batch)

    def _length_bucket(self, n: int) -> int:
        return min(-(-n // LENGTH_STEP) * LENGTH_STEP, self.max_len)

    # ------------------------------------------------------------------ the interface

    def start(self) -> "ContinuousBatchingEngine":
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def submit(self, request: GenerationRequest) -> Future:
        """Queue a request; BatcherStopped once stop() has begun, QueueFull past `max_pending` waiting."""
        if len(request.prompt_ids) + request.max_new_tokens > self.positions:
            raise ValueError(f"prompt ({len(request.prompt_ids)} tokens) + max_new_tokens ({request.max_new_tokens}) "
                             f"exceeds the engine's {self.positions} positions per request")
        if not request.prompt_ids:
            raise ValueError("the prompt is empty")
        with self._lock:
            if not self._accepting:
                raise BatcherStopped(f"{self.name} is not running")
            if self.max_pending and self.pending() >= self.max_pending:
                raise QueueFull(f"{self.name}: {self.max_pending} requests already pending")
            future: Future = Future()
            self._queue.put((request, future))
        return future

    def pending(self) -> int:
        """Requests accepted and not yet admitted to the batch."""
        return self._queue.qsize() + len(self._waiting)

    def in_flight(self) -> int:
        return len(self._running)

    def batch_stats(self) -> dict:
        return {"batches": self.steps, "max_batch_size_seen": self.max_in_flight,
                "mean_batch_size": round(self.step_rows / self.steps, 3) if self.steps else 0.0}

    def stop(self, timeout: float | None = None) -> None:
        """Take no new requests, finish those accepted, then end the worker."""
        with self._lock:
            was, self._accepting = self._accepting, False
            if was:
                self._queue.put(None)  # wakes an idle worker
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the worker

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                self._take(block=not (self._running or self._waiting or self._stopping))
                if self._stopping and not self._running and not self._waiting:
                    return
                try:
                    self._admit()
                    if self._running:
                        self._decode()
                except BaseException as e:  # a failed forward fails what it held; the worker goes on
                    log.exception("%s: step failed", self.name)
                    for run in list(self._running.values()):
                        self._finish(run, None, error=e)

    def _take(self, block: bool) -> None:
        """Move queued requests to `_waiting` (blocking for one when the engine is idle)."""
        while True:
            try:
                entry = self._queue.get(block=block)
            except queue.Empty:
                return
            block = False
            if entry is None:
                self._stopping = True
                continue
            request, future = entry
            if future.set_running_or_notify_cancel():
                self._waiting.append((request, future))

    def _admit(self) -> None:
        """Prefill waiting requests into free slots, at most `prefill_tokens` prompt tokens per forward."""
        taken, budget = [], self.prefill_tokens
        while self._waiting and self._free and len(taken) < len(self._free):
            request, future = self._waiting[0]
            if request.cancelled.is_set():
                self._waiting.pop(0)
                future.set_result(Completion([], "cancelled", len(request.prompt_ids), 0))
                continue
            if taken and len(request.prompt_ids) > budget:
                break
            budget -= len(request.prompt_ids)
            taken.append(self._waiting.pop(0))
        if not taken:
            return
        slots = [heapq.heappop(self._free) for _ in taken]
        started = time.perf_counter()
        try:
            logits = self._prefill_forward([r.prompt_ids for r, _ in taken], slots)
        except BaseException as e:
            for slot, (request, future) in zip(slots, taken):
                heapq.heappush(self._free, slot)
                future.set_exception(e)
            log.exception("%s: prefill of %d failed", self.name, len(taken))
            return
        self.prefills += 1
        runs = []
        for slot, (request, future) in zip(slots, taken):
            run = _Running(request, future, slot, position=len(request.prompt_ids), token=-1)
            self._running[slot] = run
            runs.append(run)
        self._pick(runs, list(range(len(runs))), logits, logits.argmax(-1))
        if self.on_batch is not None:
            self.on_batch(len(taken), time.perf_counter() - started)

    def _decode(self) -> None:
        started = time.perf_counter()
        top = max(self._running) + 1
        batch = self._batch_bucket(top)
        length = self._length_bucket(max(r.position for r in self._running.values()) + 1)
        tokens, positions = [0] * batch, [0] * batch  # free slots inside the bucket run a dummy token
        for slot, run in self._running.items():
            tokens[slot], positions[slot] = run.token, run.position
        self._host_tokens[:batch] = torch.tensor(tokens)
        self._host_positions[:batch] = torch.tensor(positions)
        self.in_tokens[:batch].copy_(self._host_tokens[:batch], non_blocking=True)
        self.in_positions[:batch].copy_(self._host_positions[:batch], non_blocking=True)
        logits, picked = self._step(batch, length)
        runs = sorted(self._running.values(), key=lambda r: r.slot)
        for run in runs:
            run.position += 1
        self.steps += 1
        self.step_rows += len(runs)
        self.max_in_flight = max(self.max_in_flight, len(runs))
        self._pick(runs, [r.slot for r in runs], logits, picked)
        if self.on_batch is not None:
            self.on_batch(len(runs), time.perf_counter() - started)

    def _pick(self, runs: Sequence[_Running], rows: Sequence[int], logits: torch.Tensor,
              picked: torch.Tensor) -> None:
        """The next token of each run (its row of the logits: its slot in a decode step, its
        index in a prefill), under its grammar when it has one; then finish those that are done."""
        constrained = [(row, run) for row, run in zip(rows, runs) if run.request.constraint is not None]
        tokens = picked.tolist()
        for row, run in constrained:
            allowed = run.request.constraint.mask()
            if allowed is not None:
                masked = logits[row].clone()
                apply_mask(masked, allowed)
                tokens[row] = int(masked.argmax())
        now = time.perf_counter()
        for row, run in zip(rows, runs):
            token, r = tokens[row], run.request
            if r.constraint is not None:
                r.constraint.consume(token)
            if r.cancelled.is_set():
                self._finish(run, "cancelled")
            elif token in self.stop_ids:
                self._finish(run, "stop", stop_token=token)
            else:
                run.generated.append(token)
                run.token = token
                if run.first_token_at is None:
                    run.first_token_at = now
                if r.on_token is not None:
                    r.on_token(token)
                if len(run.generated) >= r.max_new_tokens:
                    self._finish(run, "length")

    def _finish(self, run: _Running, reason: str | None, stop_token: int | None = None,
                error: BaseException | None = None) -> None:
        self._running.pop(run.slot, None)
        heapq.heappush(self._free, run.slot)
        if error is not None:
            run.future.set_exception(error)
            return
        run.future.set_result(Completion(token_ids=run.generated, finish_reason=reason,
                                         prompt_tokens=len(run.request.prompt_ids),
                                         batch_size=len(self._running) + 1, stop_token_id=stop_token))
