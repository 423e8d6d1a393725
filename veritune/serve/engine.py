"""Continuous batching over a static KV cache: the built-in serving engine on a GPU.

    engine = ContinuousBatchingEngine(model, stop_ids, max_batch=64, max_len=2048).start()
    future = engine.submit(GenerationRequest(prompt_ids=[...], max_new_tokens=128))
    completion = future.result()          # a veritune.infer.decode.Completion
    engine.stop()                         # finishes what was accepted, then the worker exits

One worker thread owns the model. A request taken from the queue gets a free slot of a cache
allocated once, `[layers][slots, kv_heads, max_len, head_dim]`, and its prompt is prefilled
into that slot in pieces. A step is one forward over *rows*: the next token of every slot
that is decoding, then up to a budget of prompt tokens of the requests waiting for their first
token, pieces of several prompts split anywhere (a *mixed step*, the chunked prefill of vLLM
and SGLang). Linear layers run over all rows at once, so the weights a decode step reads
anyway also serve the prefill, and decoding never stops for a prompt. While nothing decodes a
step takes up to `prefill_tokens` prompt tokens; while slots decode, the prompt tokens that
refill slots as fast as they empty (`_plan`), so a burst of requests starts spread out and
never settles into waves that all prefill, then all decode. `mixed=False` runs prefill and
decode as separate steps instead. A prompt's last piece gives its first token. A request
leaves the batch the step it finishes (stop token, its own `max_new_tokens`, cancelled), and
its slot goes to the next one waiting, so requests join and leave between any two steps;
nothing is recomputed and no cache is moved.

In the kernel form the host runs one step ahead of the device: the next
step is planned and queued before the last one is read, its decode rows taking their tokens
from the last step's picks on the device (`last_picked`), so the host's bookkeeping (reading
picks, stop tokens, streaming, planning) overlaps the GPU's work instead of idling it between
steps. A request that wrote a stop token has one more row computed before the host sees it,
which is discarded. A step with a row whose token the host must pick (a grammar's mask, a
sampled draw) is read before the next one is queued.

The forward is written here over the weights of a transformers `LlamaForCausalLM` (RMSNorm,
RoPE from the model's own rotary tables, grouped-query attention over the cache, SwiGLU), with
the q/k/v and gate/up projections each fused into one matrix (the model's own weights become
views of it: no second copy). That makes a step a fixed sequence of kernels on fixed buffers.
Attention is `veritune.serve.slot_attention`, a Triton kernel in which every row reads its own slot's
keys up to its own position (decode rows and prompt pieces alike, loop bounds on the GPU). On
CUDA each step is captured once as a CUDA graph per (batch bucket, chunk bucket) and replayed,
so a step of 32 layers costs a few launches instead of ~600: the eager step of an 8B model at
batch 64 spends most of its time launching kernels, not reading weights. Buckets: decode batches
of 1, 2, 4, ..., 128 (slots are handed out lowest first, so the batch is the highest slot in use,
rounded up) and prompt chunks of CHUNK_BUCKETS tokens (a step's pieces padded up to one).
Graphs are captured on first use (`warmup` captures them ahead). Picking a token runs outside
the graph on its logits, per request, with the decoding loop's own `decode.choose`: the grammar
mask of a constrained tool call, then greedy (the graph's argmax) or sampled at the request's
temperature from its generator, so a served agent turn samples as `agent_eval`'s do.

Without Triton (a CPU; the tests) the same forward runs eagerly with SDPA: decode rows over the
first `length` positions of every slot masked past their own, prompt pieces causally over their
slot's prefix (on CUDA without Triton the decode steps are graphs per length bucket, multiples
of LENGTH_STEP). The server keeps `generate_batch` on a CPU.

More than 400 lines on purpose (~1,000): the forwards, the graph capture and the scheduler that
runs one step ahead share one set of static input buffers, the picks fed back on the device and
one KV cache that the captured graphs read and write by address, so they live in one class; the
two kernels, the pieces that stand alone (attention, RoPE with the cache writes), are
`veritune.serve.slot_attention`.
"""

from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from veritune.infer.decode import Completion, GenerationRequest, choose
from veritune.serve import slot_attention
from veritune.serve.batching import BatcherStopped, QueueFull

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CHUNK_BUCKETS = (64, 128, 256, 512, 1024, 2048)  # prompt tokens of a step (its pieces, padded up to one of these)
MAX_PIECES = 8  # prompt pieces in one step (the LM head reads the last row of each)
LENGTH_STEP = 256  # SDPA decode graphs (no Triton): length buckets in multiples of this
MIN_CHUNK = 256  # prompt tokens a mixed step may take at least (when waiting): smaller pieces only add steps
# Eager prompt pieces (SDPA) have a new shape nearly every time: cuDNN attention plans one graph
# per shape (tens of ms each), flash and memory-efficient attention need none.
PIECE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


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
    qkv: torch.Tensor  # [q; k; v] rows: one matrix, one GEMM
    o: torch.Tensor
    ln2: torch.Tensor
    gate_up: torch.Tensor  # [gate; up]
    down: torch.Tensor


def _fuse(linears) -> torch.Tensor:
    """One weight of the rows of `linears` stacked; each linear's weight becomes a view of it,
    so the model (transformers' forward, used beside the engine) keeps working on one copy."""
    fused = torch.cat([lin.weight.data for lin in linears])
    at = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight.data = fused[at : at + n]
        at += n
    return fused


@dataclass
class _Running:
    request: GenerationRequest
    future: Future
    slot: int
    position: int  # where the next token's key and value go (= tokens in the cache)
    token: int  # the last token picked and read: the next step's input (unless one is in flight)
    generated: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    issued: int = 0  # tokens it will have once every step launched is read
    in_flight: int = 0  # steps launched that give it a token, not yet read
    done: bool = False


def _host_picks(run: _Running) -> bool:
    """Whether the host must pick this run's next token (a grammar's mask, a sampled draw)
    before a step can feed it back: otherwise the step's own argmax on the device is it."""
    return run.request.constraint is not None or run.request.temperature > 0


@dataclass
class _Step:
    """A forward launched and not yet read: which run gets a token from which row."""

    runs: list[_Running]
    rows: list[int]
    logits: torch.Tensor
    picked: torch.Tensor
    host: torch.Tensor | None  # `picked` copied to pinned memory behind the step (CUDA, overlapped)
    event: object | None  # recorded after that copy
    decode_rows: int
    started: float


class ContinuousBatchingEngine:
    """Continuous batching of generation over a static KV cache (see the module docstring).

    Same interface as `veritune.serve.batching.MicroBatcher` for the server: `start`, `submit`,
    `pending`, `stop`, `batch_stats`; requests and completions are those of `generate_batch`.
    `attention`: "auto" (the Triton kernel where it runs, else SDPA), "kernel" or "sdpa".
    """

    def __init__(
        self,
        model,
        stop_ids: Sequence[int],
        max_batch: int = 64,
        max_len: int = 2048,
        prefill_tokens: int = 2048,
        cuda_graphs: bool = True,
        max_pending: int = 0,
        name: str = "engine",
        fuse: bool = True,
        mixed_tokens: int = 1024,
        mixed: bool = True,
        attention: str = "auto",
        overlap: bool = True,
    ):
        why = supported(model)
        if why is not None:
            raise ValueError(
                f"the continuous-batching engine runs bias-free Llama models with SwiGLU; this one has {why}"
            )
        if max_batch < 1 or max_batch > BATCH_BUCKETS[-1]:
            raise ValueError(f"max_batch must be in 1..{BATCH_BUCKETS[-1]}, got {max_batch}")
        if prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be >= 1, got {prefill_tokens}")
        if mixed_tokens < 1:
            raise ValueError(f"mixed_tokens must be >= 1, got {mixed_tokens}")
        if attention not in ("auto", "kernel", "sdpa"):
            raise ValueError(f"attention must be auto, kernel or sdpa, got {attention!r}")
        cfg = model.config
        self.model, self.name = model, name
        self.max_batch, self.max_pending = max_batch, max_pending
        self.mixed = mixed
        self.stop_ids = sorted(set(int(s) for s in stop_ids))
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.kernel = attention == "kernel" or (attention == "auto" and slot_attention.available(self.device))
        if self.kernel and not slot_attention.available(self.device):
            raise ValueError("attention='kernel' needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        if self.kernel and group > slot_attention.DECODE_QUERIES:  # a decode tile holds that many query heads
            if attention == "kernel":
                raise ValueError(f"the slot kernel serves up to {slot_attention.DECODE_QUERIES} query heads a kv head")
            self.kernel = False
        if self.kernel:
            # Steps carry at most the largest chunk bucket of prompt tokens.
            top = max([c for c in CHUNK_BUCKETS if c <= max(prefill_tokens, mixed_tokens)] or [CHUNK_BUCKETS[0]])
            self.chunk_buckets = tuple(c for c in CHUNK_BUCKETS if c <= top)
            prefill_tokens, mixed_tokens = min(prefill_tokens, top), min(mixed_tokens, top)
        self.prefill_tokens, self.mixed_tokens = prefill_tokens, mixed_tokens
        self.ops = EAGER_OPS
        if fuse and self.device.type == "cuda":
            self.ops = self._try_fused()
        self.eps = cfg.rms_norm_eps
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.group = self.n_heads // self.n_kv
        self.scale = self.head_dim**-0.5
        self.q_width, self.kv_width = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.mlp_width = cfg.intermediate_size
        # Lengths are bucketed in steps of LENGTH_STEP; the cache holds whole buckets.
        positions = int(getattr(cfg, "max_position_embeddings", max_len))
        self.max_len = min(-(-max_len // LENGTH_STEP) * LENGTH_STEP, -(-positions // LENGTH_STEP) * LENGTH_STEP)
        self.positions = min(positions, self.max_len)  # a request's prompt + new tokens must fit this

        inner = model.model
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        self.lm_head = model.lm_head.weight
        with torch.no_grad():
            self.layers = [
                _Layer(
                    layer.input_layernorm.weight,
                    _fuse([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                    layer.self_attn.o_proj.weight,
                    layer.post_attention_layernorm.weight,
                    _fuse([layer.mlp.gate_proj, layer.mlp.up_proj]),
                    layer.mlp.down_proj.weight,
                )
                for layer in inner.layers
            ]
        with torch.inference_mode():
            # The model's own rotary tables (llama3 scaling, attention scaling), in its dtype, as its forward uses them.
            probe = torch.zeros(1, 1, self.head_dim, device=self.device, dtype=self.dtype)
            cos, sin = inner.rotary_emb(probe, torch.arange(self.max_len, device=self.device)[None])
            self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()
            shape = (max_batch, self.n_kv, self.max_len, self.head_dim)
            self.k_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
            self.v_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
            self.slot_index = torch.arange(max_batch, device=self.device)
            self.t_index = torch.arange(self.max_len, device=self.device)
            self.kv_index = torch.arange(self.n_kv, device=self.device)
        self._static_inputs()  # outside inference mode: the worker and tests write them in place
        # Kernel form: the next step is queued before the last one is read (with `mixed=False`, the
        # decode steps; a prefill step is read at once).
        self.overlap = overlap and self.kernel
        self._host_flip = self._picks_flip = 0
        self._credit = 0.0  # prompt tokens owed to the mixed steps (see _plan)
        # The picks of a step, copied to pinned memory behind it, in turns: with separate prefill
        # steps a prefill step and the next decode step are both queued before a decode step in
        # flight is read, so three copies (two would hand the last one's buffer to the next).
        picks = max_batch + MAX_PIECES
        self._picks_host = [
            torch.zeros(picks, dtype=torch.long, pin_memory=self.device.type == "cuda") for _ in range(3)
        ]
        self.cache_bytes = 2 * sum(t.numel() * t.element_size() for t in self.k_cache)
        self._graphs: dict[tuple[int, int], tuple] = {}
        self._pool = None

        self._queue: queue.Queue = queue.Queue()
        self._waiting: list[tuple[GenerationRequest, Future]] = []  # taken from the queue, not yet admitted
        self._running: dict[int, _Running] = {}
        self._prefilling: list[
            _Running
        ] = []  # slot held, prompt partly in the cache (`position` tokens), in arrival order
        self._free = list(range(max_batch))  # a heap: lowest slot first keeps the batch bucket small
        self._lock = threading.Lock()
        self._accepting = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run
        self.step_rows = 0  # requests summed over decode steps (mean batch = step_rows / steps)
        self.max_in_flight = 0
        self.prefills = 0  # forwards that carried prompt tokens
        self.mixed_steps = 0  # of those, the ones that also decoded
        self.on_batch = None  # (size, seconds) after each decode step, as MicroBatcher reports batches

    def _static_inputs(self) -> None:
        """The inputs of a step, fixed buffers a CUDA graph reads: one int64 tensor, filled from a
        pinned host copy in one transfer a step. Decode rows: token, position, keys seen (ctx;
        0 for a free slot's dummy row) and `feedback` (1: the token is the one this slot picked
        in the step before, read on the device from `last_picked`; kernel form). Prompt rows
        (kernel form): token, position, slot, ctx; the tiles of the kernel (start row, rows);
        the row of each piece's last token and its slot. Two pinned host copies take turns, so
        that one can be filled while the other's transfer is still queued behind a step."""
        chunk = self.chunk_buckets[-1] if self.kernel else 0
        self.rows_per_tile = slot_attention.rows_per_tile(self.group)
        self.max_tiles = -(-chunk // self.rows_per_tile) + MAX_PIECES if chunk else 0
        sizes = {
            "tokens": self.max_batch,
            "positions": self.max_batch,
            "ctx": self.max_batch,
            "feedback": self.max_batch if self.kernel else 0,
            "chunk_tokens": chunk,
            "chunk_positions": chunk,
            "chunk_slots": chunk,
            "chunk_ctx": chunk,
            "tile_start": self.max_tiles,
            "tile_rows": self.max_tiles,
            "last": MAX_PIECES if chunk else 0,
            "last_slots": MAX_PIECES if chunk else 0,
        }
        total = sum(sizes.values())
        self.inputs = torch.zeros(total, dtype=torch.long, device=self.device)
        pinned = self.device.type == "cuda"
        self._hosts = [torch.zeros(total, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._host = self._hosts[0]
        self._at, at = {}, 0
        for name, n in sizes.items():
            self._at[name] = (at, n)
            at += n
        for name in sizes:
            setattr(self, "in_" + name, self._input(name))
        self.decode_tile_rows = torch.ones(self.max_batch, dtype=torch.long, device=self.device)
        # The token each slot picked in the latest step that gave it one (one spare entry: the
        # target of unused pieces); the next step's decode rows read it where `feedback` says.
        self.last_picked = torch.zeros(self.max_batch + 1, dtype=torch.long, device=self.device)

    def _input(self, name: str, host: bool = False) -> torch.Tensor:
        at, n = self._at[name]
        return (self._host if host else self.inputs)[at : at + n]

    def _try_fused(self) -> dict:
        """The compiled element-wise ops, checked against the eager ones on this device; the
        eager ones where compilation is unavailable (no Triton) or disagrees."""
        try:
            ops = fused_ops()
            x = torch.randn(3, 64, device=self.device, dtype=self.dtype)
            w = torch.randn(64, device=self.device, dtype=self.dtype)
            cos, sin = torch.randn(2, 3, 1, 16, device=self.device, dtype=self.dtype)
            q, k = x.view(3, 4, 16), x[:, :32].reshape(3, 2, 16)
            checks = [
                (ops["rms"](x, w, 1e-5), _rms_norm(x, w, 1e-5)),
                (ops["add_rms"](x, x, w, 1e-5)[1], _add_rms_norm(x, x, w, 1e-5)[1]),
                (ops["rope_qk"](q, k, cos, sin)[1], _rope_qk(q, k, cos, sin)[1]),
                (ops["silu_mul"](x, x), _silu_mul(x, x)),
            ]
            tol = 1e-2 if self.dtype == torch.bfloat16 else 1e-4
            if all(torch.allclose(a.float(), b.float(), rtol=tol, atol=tol) for a, b in checks):
                return ops
            log.warning("%s: compiled element-wise ops disagree with eager ones; running eager", self.name)
        except Exception as e:  # no Triton / no compiler on this machine
            log.warning("%s: element-wise ops not compiled (%s: %s); running eager", self.name, type(e).__name__, e)
        return EAGER_OPS

    # ------------------------------------------------------------------ the forward passes

    def _project(self, h: torch.Tensor, w: _Layer, cos: torch.Tensor, sin: torch.Tensor):
        """q, k (RoPE applied) and v of rows `h`: one GEMM over the fused q/k/v weight."""
        d, qw, kw = self.head_dim, self.q_width, self.kv_width
        qkv = F.linear(h, w.qkv)
        q, k = self.ops["rope_qk"](
            qkv[:, :qw].view(-1, self.n_heads, d), qkv[:, qw : qw + kw].view(-1, self.n_kv, d), cos, sin
        )
        return q, k, qkv[:, qw + kw :].reshape(-1, self.n_kv, d)

    def _mlp_block(self, x: torch.Tensor, o: torch.Tensor, w: _Layer, nxt: torch.Tensor | None):
        """The attention output projected and added, then the SwiGLU block (one GEMM over the fused
        gate/up weight); returns the residual stream and its norm for the next layer (`nxt`)."""
        ops, eps, m = self.ops, self.eps, self.mlp_width
        x, h = ops["add_rms"](x, F.linear(o, w.o), w.ln2, eps)
        gate_up = F.linear(h, w.gate_up)
        down = F.linear(ops["silu_mul"](gate_up[:, :m], gate_up[:, m:]), w.down)
        if nxt is None:
            return x + down, None
        return ops["add_rms"](x, down, nxt, eps)

    def _slot_forward(self, batch: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel form of a step, over the static inputs: `batch` decode rows (slot = row)
        followed by `chunk` prompt rows, every row attending over its own slot's cache up to its
        own position (`veritune.serve.slot_attention`). Logits: the decode rows, then with `chunk` the
        last row of each of MAX_PIECES pieces (`in_last`; unused ones repeat row 0)."""
        hkv = self.n_kv
        feedback = self.in_feedback[:batch] != 0
        tokens, positions, slots, ctx = (
            torch.where(feedback, self.last_picked[:batch], self.in_tokens[:batch]),
            self.in_positions[:batch],
            self.slot_index[:batch],
            self.in_ctx[:batch],
        )
        if chunk:
            tokens = torch.cat([tokens, self.in_chunk_tokens[:chunk]])
            positions = torch.cat([positions, self.in_chunk_positions[:chunk]])
            slots = torch.cat([slots, self.in_chunk_slots[:chunk]])
            ctx = torch.cat([ctx, self.in_chunk_ctx[:chunk]])
            tiles = -(-chunk // self.rows_per_tile) + MAX_PIECES
        rows = ((slots[:, None] * hkv + self.kv_index[None]) * self.max_len + positions[:, None]).reshape(-1)
        x = F.embedding(tokens, self.embed)
        cos, sin = self.cos[positions], self.sin[positions]  # [rows, head_dim]
        h = self.ops["rms"](x, self.layers[0].ln1, self.eps)
        for i, w in enumerate(self.layers):
            kc, vc = self.k_cache[i], self.v_cache[i]
            # RoPE, and the new keys and values into the cache, in one kernel.
            q = slot_attention.rope_store(F.linear(h, w.qkv), cos, sin, kc, vc, rows, self.n_heads, hkv)
            # Prompt padding rows are in no tile: zeros, not whatever memory held (every decode row is written).
            o = torch.zeros_like(q) if chunk else torch.empty_like(q)
            if batch:
                slot_attention.slot_attention(
                    q,
                    kc,
                    vc,
                    slots,
                    ctx,
                    self.slot_index[:batch],
                    self.decode_tile_rows[:batch],
                    slot_attention.DECODE_QUERIES,
                    self.scale,
                    out=o,
                )
            if chunk:
                slot_attention.slot_attention(
                    q,
                    kc,
                    vc,
                    slots,
                    ctx,
                    self.in_tile_start[:tiles],
                    self.in_tile_rows[:tiles],
                    slot_attention.PIECE_QUERIES,
                    self.scale,
                    out=o,
                )
            x, h = self._mlp_block(
                x, o.reshape(o.shape[0], -1), w, self.layers[i + 1].ln1 if i + 1 < len(self.layers) else self.norm
            )
        if chunk:  # the LM head only on the rows that pick a token
            h = h.index_select(0, torch.cat([self.slot_index[:batch], self.in_last]))
        logits = F.linear(h, self.lm_head)
        picked = logits.argmax(-1)
        # Each slot's pick, for a next step that feeds it back: decode rows (slot = row), then the
        # pieces' (a piece that completes its prompt gives its slot's first token).
        self.last_picked[:batch].copy_(picked[:batch])
        if chunk:
            self.last_picked.index_copy_(0, self.in_last_slots, picked[batch:])
        return logits, picked

    def _decode_forward(self, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The SDPA form of a decode step (no Triton): one token for slots [0, batch), inputs in
        `in_tokens` / `in_positions`; attention over the first `length` positions of each slot's
        cache, masked past the slot's own position."""
        eps, d, hkv = self.eps, self.head_dim, self.n_kv
        tokens, positions = self.in_tokens[:batch], self.in_positions[:batch]
        rows = (
            (self.slot_index[:batch, None] * hkv + self.kv_index[None]) * self.max_len + positions[:, None]
        ).reshape(-1)
        visible = self.t_index[:length][None] <= positions[:, None]
        # One additive mask for all layers ([batch, 1, 1, length]; SDPA would convert a boolean one per call).
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill_(~visible, float("-inf"))[
            :, None, None, :
        ]
        x = F.embedding(tokens, self.embed)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [rows, 1, head_dim]
        h = self.ops["rms"](x, self.layers[0].ln1, eps)
        for i, w in enumerate(self.layers):
            q, k, v = self._project(h, w, cos, sin)
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc.view(-1, d).index_copy_(0, rows, k.reshape(-1, d))
            vc.view(-1, d).index_copy_(0, rows, v.reshape(-1, d))
            # The query heads of one kv head side by side as its "query length": GQA without copies.
            o = F.scaled_dot_product_attention(
                q.reshape(batch, hkv, self.group, d),
                kc[:batch, :, :length],
                vc[:batch, :, :length],
                attn_mask=mask,
                scale=self.scale,
            )
            x, h = self._mlp_block(
                x, o.reshape(batch, -1), w, self.layers[i + 1].ln1 if i + 1 < len(self.layers) else self.norm
            )
        logits = F.linear(h, self.lm_head)
        return logits, logits.argmax(-1)

    def _mixed_forward(
        self,
        dec_tokens: Sequence[int],
        dec_positions: Sequence[int],
        length: int,
        pieces: Sequence[tuple[int, int, Sequence[int]]],
    ) -> torch.Tensor:
        """The SDPA form of a step, eager: the decode tokens of slots [0, len(dec_tokens))
        (attention over the first `length` positions of each slot's cache, masked past its own
        position) followed by prompt pieces `(slot, start, tokens)`: tokens at positions start..
        of that slot, attending causally over the slot's cache before `start` and the piece
        itself. Linear layers run on all rows at once. Returns the logits of the decode rows, then
        of each piece's last token: [len(dec_tokens) + len(pieces), vocab]."""
        dev, d, hkv, eps = self.device, self.head_dim, self.n_kv, self.eps
        batch = len(dec_tokens)
        sizes = [len(t) for _, _, t in pieces]
        tokens = torch.tensor(
            list(dec_tokens) + [t for _, _, toks in pieces for t in toks], dtype=torch.long, device=dev
        )
        positions = torch.tensor(
            list(dec_positions) + [start + i for (_, start, _), n in zip(pieces, sizes) for i in range(n)],
            dtype=torch.long,
            device=dev,
        )
        slot_of = torch.tensor(
            list(range(batch)) + [slot for (slot, _, _), n in zip(pieces, sizes) for _ in range(n)],
            dtype=torch.long,
            device=dev,
        )
        rows = ((slot_of[:, None] * hkv + self.kv_index[None]) * self.max_len + positions[:, None]).reshape(-1)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        if batch:
            visible = self.t_index[:length][None] <= positions[:batch, None]
            dec_mask = torch.zeros(visible.shape, dtype=self.dtype, device=dev).masked_fill_(~visible, float("-inf"))[
                :, None, None, :
            ]
        # A piece after earlier ones attends over its slot's cache prefix too: key j is visible to
        # the piece's query i when j <= start + i, causal aligned bottom-right (SDPA's is_causal is
        # top-left); as a CausalBias it runs in the flash / memory-efficient kernels, no mask built.
        piece_masks = [causal_lower_right(n, start + n) for (_, start, _), n in zip(pieces, sizes)]
        x = F.embedding(tokens, self.embed)
        h = self.ops["rms"](x, self.layers[0].ln1, eps)
        for i, w in enumerate(self.layers):
            q, k, v = self._project(h, w, cos, sin)
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc.view(-1, d).index_copy_(0, rows, k.reshape(-1, d))
            vc.view(-1, d).index_copy_(0, rows, v.reshape(-1, d))
            outs = []
            if batch:
                o = F.scaled_dot_product_attention(
                    q[:batch].reshape(batch, hkv, self.group, d),
                    kc[:batch, :, :length],
                    vc[:batch, :, :length],
                    attn_mask=dec_mask,
                    scale=self.scale,
                )
                outs.append(o.reshape(batch, -1))
            at = batch
            for (slot, start, _), n, mask in zip(pieces, sizes, piece_masks):
                qp = q[at : at + n].transpose(0, 1)[None]  # [1, heads, n, d]
                if start == 0:
                    kp, vp = k[at : at + n].transpose(0, 1), v[at : at + n].transpose(0, 1)
                else:
                    kp, vp = kc[slot, :, : start + n], vc[slot, :, : start + n]
                # kv head j serves query heads j*group ... (j+1)*group-1
                kp = kp.repeat_interleave(self.group, dim=0)[None]
                vp = vp.repeat_interleave(self.group, dim=0)[None]
                with sdpa_kernel(PIECE_BACKENDS):
                    o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=self.scale)
                outs.append(o[0].transpose(0, 1).reshape(n, -1))
                at += n
            o = outs[0] if len(outs) == 1 else torch.cat(outs)
            x, h = self._mlp_block(x, o, w, self.layers[i + 1].ln1 if i + 1 < len(self.layers) else None)
        ends = torch.tensor(sizes, dtype=torch.long, device=dev).cumsum(0) - 1 + batch
        keep = torch.cat([torch.arange(batch, device=dev), ends])
        # The LM head only on the rows that pick a token (the others are 4 bytes x vocab each).
        return F.linear(self.ops["rms"](x[keep], self.norm, eps), self.lm_head)

    def _prefill_forward(self, prompts: Sequence[Sequence[int]], slots: Sequence[int]) -> torch.Tensor:
        """Whole prompts into their slots' cache, nothing decoding (SDPA form): the logits of
        each prompt's last position [n, vocab]."""
        return self._mixed_forward([], [], 0, [(slot, 0, p) for slot, p in zip(slots, prompts)])

    def _forward(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._slot_forward(*key) if self.kernel else self._decode_forward(*key)

    def _step(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the step `key` over the static inputs: (batch, chunk) in the kernel form, (batch,
        length) in the SDPA form; a graph replay on CUDA."""
        if not self.cuda_graphs:
            return self._forward(key)
        if key not in self._graphs:
            self._capture(key)
        graph, logits, picked = self._graphs[key]
        graph.replay()
        return logits, picked

    def _capture(self, key: tuple[int, int]) -> None:
        started = time.perf_counter()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # A step captured on first use runs on live inputs: its warm-up runs must leave the picks
        # the step reads back (`last_picked`) as they found them, or the replay would read their own.
        kept = self.last_picked.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            # Warm-up runs (compile the kernels) write the cache entries the replay writes again: harmless.
            for _ in range(2):
                self._forward(key)
                self.last_picked.copy_(kept)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits, picked = self._forward(key)
        self._graphs[key] = (graph, logits, picked)
        log.info("%s: captured the step %s (%.2f s)", self.name, key, time.perf_counter() - started)

    @torch.inference_mode()
    def warmup(
        self,
        batches: Sequence[int] = BATCH_BUCKETS,
        lengths: Sequence[int] = (LENGTH_STEP,),
        chunks: Sequence[int] | None = None,
    ) -> None:
        """Capture the step graphs now (else each is captured on first use): kernel form, every
        decode batch bucket in `batches` (and none) with no prompt rows and with each chunk bucket
        in `chunks` (default all); SDPA form, decode steps for these batch and length buckets.
        Call before `start`: the worker thread owns the model once it runs."""
        if not self.cuda_graphs:
            return
        # Dummy inputs for the captures' warm-up runs: every row at the last position, seeing nothing (see _decode).
        self.inputs.zero_()
        self.in_positions.fill_(self.max_len - 1)
        if self.kernel:
            self.in_chunk_positions.fill_(self.max_len - 1)
            chunks = self.chunk_buckets if chunks is None else [c for c in chunks if c in self.chunk_buckets]
            keys = [
                (b, c)
                for b in sorted({0, *(self._batch_bucket(b) for b in batches if b <= self.max_batch)})
                for c in (0, *chunks)
                if b or c
            ]
        else:
            keys = [
                (self._batch_bucket(b), self._length_bucket(t)) for b in batches if b <= self.max_batch for t in lengths
            ]
        for key in keys:
            if key not in self._graphs:
                self._capture(key)
        torch.cuda.synchronize()

    def _batch_bucket(self, n: int) -> int:
        return min(next(b for b in BATCH_BUCKETS if b >= n), self.max_batch)

    def _length_bucket(self, n: int) -> int:
        return min(-(-n // LENGTH_STEP) * LENGTH_STEP, self.max_len)

    # ------------------------------------------------------------------ the interface

    def start(self) -> ContinuousBatchingEngine:
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def submit(self, request: GenerationRequest) -> Future:
        """Queue a request; BatcherStopped once stop() has begun, QueueFull past `max_pending` waiting."""
        if len(request.prompt_ids) + request.max_new_tokens > self.positions:
            raise ValueError(
                f"prompt ({len(request.prompt_ids)} tokens) + max_new_tokens ({request.max_new_tokens}) "
                f"exceeds the engine's {self.positions} positions per request"
            )
        if not request.prompt_ids:
            raise ValueError("the prompt is empty")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
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
        return len(self._running) + len(self._prefilling)

    def batch_stats(self) -> dict:
        return {
            "batches": self.steps,
            "max_batch_size_seen": self.max_in_flight,
            "mean_batch_size": round(self.step_rows / self.steps, 3) if self.steps else 0.0,
        }

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
            pending: _Step | None = None  # launched, not yet read
            while True:
                busy = self._running or self._waiting or self._prefilling or pending is not None
                self._take(block=not (busy or self._stopping))
                if self._stopping and pending is None and not (self._running or self._waiting or self._prefilling):
                    return
                try:
                    # The host picks the next token of a grammar's or a sampled row: read before the next launch.
                    if pending is not None and any(_host_picks(r) for r in pending.runs if not r.done):
                        self._collect(pending)
                        pending = None
                    self._admit()
                    step = self._launch_next()
                    if pending is not None:
                        self._collect(pending)  # while `step` runs on the device
                    pending = step
                    if pending is not None and not self.overlap:
                        self._collect(pending)
                        pending = None
                except BaseException as e:  # a failed forward fails what it held; the worker goes on
                    log.exception("%s: step failed", self.name)
                    pending = None
                    for run in list(self._running.values()) + self._prefilling:
                        self._finish(run, None, error=e)
                    self._prefilling.clear()

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
        """Give waiting requests free slots (lowest first); drop those cancelled before their first token."""
        for run in [r for r in self._prefilling if r.request.cancelled.is_set()]:
            self._prefilling.remove(run)
            heapq.heappush(self._free, run.slot)
            run.future.set_result(Completion([], "cancelled", len(run.request.prompt_ids), 0))
        while self._waiting and self._free:
            request, future = self._waiting.pop(0)
            if request.cancelled.is_set():
                future.set_result(Completion([], "cancelled", len(request.prompt_ids), 0))
                continue
            self._prefilling.append(_Running(request, future, heapq.heappop(self._free), position=0, token=-1))

    def _plan(self) -> list[tuple[_Running, int, int]]:
        """The prompt pieces of the next forward, `(run, start, count)`, in arrival order, split
        anywhere. A forward with nothing decoding takes up to `prefill_tokens`. A mixed step
        refills the slots as fast as they empty: a request frees its slot after about its
        `max_new_tokens` steps and its successor's prompt is about as long as its own, so each
        step owes sum(prompt tokens / max_new_tokens) over the requests holding slots (at least
        MIN_CHUNK, at most `mixed_tokens`). What a step cannot take (a bucket too small, too
        little waiting) is carried to the next as credit, so prefill keeps exactly that pace
        and the requests of a burst start, and so finish, spread out instead of in lockstep.
        Kernel form: at most MAX_PIECES pieces, and a budget rounded down to a chunk bucket (a
        step pads up to one). SDPA form with `mixed=False`: whole prompts, the first one
        whatever its length."""
        if not self._prefilling:
            self._credit = 0.0
            return []
        mixed = self.mixed and bool(self._running)
        if mixed:
            held = [*self._running.values(), *self._prefilling]
            owed = sum(len(r.request.prompt_ids) / max(1, r.request.max_new_tokens) for r in held)
            self._credit = min(self._credit + max(MIN_CHUNK, owed), self.mixed_tokens)
            budget = int(self._credit)
        else:
            self._credit = 0.0
            budget = self.prefill_tokens
        if self.kernel:
            budget = max([c for c in self.chunk_buckets if c <= budget] or [self.chunk_buckets[0]])
        whole = not self.mixed and not self.kernel
        pieces = []
        for run in self._prefilling:
            rest = len(run.request.prompt_ids) - run.position
            if whole:
                if pieces and rest > budget:
                    break
                count = rest
            else:
                count = min(rest, budget)
            if count <= 0 or (self.kernel and len(pieces) == MAX_PIECES):
                break
            pieces.append((run, run.position, count))
            budget -= count
        if mixed:
            self._credit = max(0.0, self._credit - sum(count for _, _, count in pieces))
        return pieces

    def _live(self) -> list[_Running]:
        """The runs a decode step gives a token, by slot: running, with tokens still to come
        once the steps in flight are read (one that has just written a stop token there still
        counts: a wasted row, skipped when read)."""
        live = [r for r in self._running.values() if not r.done and r.issued < r.request.max_new_tokens]
        return sorted(live, key=lambda r: r.slot)

    def _launch_next(self) -> _Step | None:
        """Plan and launch the next forward: a mixed step (prompt pieces and the live runs), or
        with `mixed=False` a prefill step (read at once) and then a decode step."""
        pieces = self._plan()
        if self.mixed:
            live = self._live()
            return self._launch(pieces, live) if pieces or live else None
        if pieces:
            self._collect(self._launch(pieces, []))
        live = self._live()
        return self._launch([], live) if live else None

    def _launch(self, pieces: Sequence[tuple[_Running, int, int]], runs: Sequence[_Running]) -> _Step:
        """Queue one forward over the prompt pieces and one token of each of `runs` (a mixed
        step; either may be empty) without waiting for it; runs whose prompt completes get their
        first token from it. The host's view moves on at once (positions, tokens to come), so
        the next step can be planned and queued while this one runs."""
        started = time.perf_counter()
        batch = runs[-1].slot + 1 if runs else 0
        if self.kernel:
            batch = self._batch_bucket(batch) if batch else 0
            self._flip_host()
            self._fill_decode_rows(runs, batch)
            chunk = self._fill_chunk(pieces, batch)
            logits, picked = self._step((batch, chunk))
        elif pieces:
            tokens, positions = [0] * batch, [self.max_len - 1] * batch  # free slots run a dummy token (see _decode)
            for run in runs:
                tokens[run.slot], positions[run.slot] = run.token, run.position
            # Lengths bucketed as in the graphs: a handful of attention shapes (cuDNN plans one per shape).
            length = self._length_bucket(max(positions[r.slot] for r in runs) + 1) if runs else 0
            logits = self._mixed_forward(
                tokens,
                positions,
                length,
                [(run.slot, start, run.request.prompt_ids[start : start + count]) for run, start, count in pieces],
            )
            picked = logits.argmax(-1)
        else:
            batch = self._batch_bucket(batch)
            self._flip_host()
            self._fill_decode_rows(runs, batch)
            self.inputs.copy_(self._host, non_blocking=True)
            logits, picked = self._step((batch, self._length_bucket(max(r.position for r in runs) + 1)))
        if pieces:
            self.prefills += 1
            self.mixed_steps += bool(runs)
        if runs:
            self.steps += 1
            self.step_rows += len(runs)
        for run in runs:
            run.position += 1
        out, rows = list(runs), [run.slot for run in runs]
        for j, (run, start, count) in enumerate(pieces):
            run.position = start + count
            if run.position == len(run.request.prompt_ids):
                self._prefilling.remove(run)
                self._running[run.slot] = run
                out.append(run)
                rows.append(batch + j)
        for run in out:
            run.issued += 1
            run.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, len(self._running))
        host = event = None
        if self.overlap and self.device.type == "cuda":
            # The picks to pinned memory behind the step, before a next step's graph can overwrite them.
            self._picks_flip = (self._picks_flip + 1) % len(self._picks_host)
            host = self._picks_host[self._picks_flip][: picked.shape[0]]
            host.copy_(picked, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        return _Step(out, rows, logits, picked, host, event, len(runs), started)

    def _flip_host(self) -> None:
        """The other pinned host copy of the inputs: the last one's transfer may still be queued."""
        self._host_flip ^= 1
        self._host = self._hosts[self._host_flip]

    def _fill_decode_rows(self, runs: Sequence[_Running], batch: int) -> None:
        """Decode rows of slots [0, batch) into the host inputs. Free slots inside the bucket run a
        dummy token written at the last position of their slot, seeing nothing: a request reads
        only positions it wrote itself, and never writes that one (prompt + new tokens fit
        `positions` <= max_len, and the last token picked is not fed back), so a slot between two
        pieces of its prompt keeps what it has. A run whose last token is still in a step in
        flight reads it on the device (`feedback`)."""
        tokens, positions, ctx = [0] * batch, [self.max_len - 1] * batch, [0] * batch
        feedback = [0] * batch
        for run in runs:
            tokens[run.slot], positions[run.slot], ctx[run.slot] = run.token, run.position, run.position + 1
            feedback[run.slot] = int(run.in_flight > 0)
        names = ("tokens", "positions", "ctx", "feedback") if self.kernel else ("tokens", "positions", "ctx")
        for name, values in zip(names, (tokens, positions, ctx, feedback)):
            if values:
                self._input(name, host=True)[:batch] = torch.tensor(values)

    def _fill_chunk(self, pieces: Sequence[tuple[_Running, int, int]], batch: int) -> int:
        """The prompt rows of a kernel-form step into the host inputs: the pieces' tokens, padded
        up to the chunk bucket (padding rows write at the last position of slot 0 and see
        nothing), the tiles of `rows_per_tile` rows of one piece each, each piece's last row and
        slot; then the inputs to the device. Returns the chunk bucket (0: no prompt rows)."""
        taken = sum(count for _, _, count in pieces)
        chunk = min(c for c in self.chunk_buckets if c >= taken) if taken else 0
        tokens, positions, slots, ctx, tile_start, tile_rows, last, last_slots = [], [], [], [], [], [], [], []
        for run, start, count in pieces:
            for off in range(0, count, self.rows_per_tile):
                tile_start.append(batch + len(tokens) + off)
                tile_rows.append(min(self.rows_per_tile, count - off))
            tokens += run.request.prompt_ids[start : start + count]
            positions += range(start, start + count)
            ctx += range(start + 1, start + count + 1)
            slots += [run.slot] * count
            last.append(batch + len(tokens) - 1)
            last_slots.append(run.slot)
        pad = chunk - taken
        tiles = -(-chunk // self.rows_per_tile) + MAX_PIECES if chunk else 0
        unused = MAX_PIECES - len(last)
        for name, values in (
            ("chunk_tokens", tokens + [0] * pad),
            ("chunk_positions", positions + [self.max_len - 1] * pad),
            ("chunk_slots", slots + [0] * pad),
            ("chunk_ctx", ctx + [0] * pad),
            ("tile_start", tile_start + [0] * (tiles - len(tile_start))),
            ("tile_rows", tile_rows + [0] * (tiles - len(tile_rows))),
            ("last", last + [0] * unused if chunk else []),
            ("last_slots", last_slots + [self.max_batch] * unused if chunk else []),
        ):
            if values:
                self._input(name, host=True)[: len(values)] = torch.tensor(values)
        self.inputs.copy_(self._host, non_blocking=True)
        return chunk

    def _collect(self, step: _Step) -> None:
        """Read a step launched before: the next token of each of its runs (its row of the
        logits: its slot among the decode rows, or its piece's row after them), picked as the
        decoding loop picks (`decode.choose`: its grammar's mask, then greedy or sampled at its
        temperature from its generator; the step's argmax serves plain greedy rows); then finish
        those that are done."""
        if step.event is not None:
            step.event.synchronize()
        greedy = (step.host if step.host is not None else step.picked).tolist()
        now = time.perf_counter()
        for row, run in zip(step.rows, step.runs):
            run.in_flight -= 1
            if run.done:  # finished in an earlier step read: a wasted row
                continue
            r = run.request
            token = choose(step.logits[row], r, greedy[row])
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
        if self.on_batch is not None:
            self.on_batch(step.decode_rows, time.perf_counter() - step.started)

    def _finish(
        self, run: _Running, reason: str | None, stop_token: int | None = None, error: BaseException | None = None
    ) -> None:
        run.done = True
        if self._running.get(run.slot) is run:
            del self._running[run.slot]
        heapq.heappush(self._free, run.slot)
        if error is not None:
            run.future.set_exception(error)
            return
        run.future.set_result(
            Completion(
                token_ids=run.generated,
                finish_reason=reason,
                prompt_tokens=len(run.request.prompt_ids),
                batch_size=len(self._running) + 1,
                stop_token_id=stop_token,
            )
        )
