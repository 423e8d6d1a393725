"""`veritune serve`: the released model behind an OpenAI-compatible HTTP API.

    veritune serve                       # params.yaml `serve`; http://127.0.0.1:8000
    curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"model": "veritune", "messages": [{"role": "user", "content": "How do I descale the K2?"}]}'

Endpoints: POST /v1/chat/completions (with "stream": true for server-sent events),
GET /v1/models, GET /health, GET /metrics (Prometheus text format); POST /v1/completions
(raw prompts, no retrieval) only with `serve.completions_endpoint`, for serving as another
veritune's upstream.

Each answer is grounded by default: the last user message is the retrieval query, the top
`serve.retrieval_k` chunks of the index go into the prompt exactly as in training
(`chat.rag_messages` with the `build_sft` system prompt), and the response carries a
`citations` list (doc_id, chunk_id, title, score). `"retrieval": false` in a request turns it
off.

Model `<model_name>-agent` runs the customer's last message through the tool-using agent
(`veritune.agent.run_agent`, the loop `agent_eval` measures) over the shop database
`AGENT_DB`: its model turns go through the same batcher as chat requests, `search_kb`
through the index. The answer comes with `citations` (the documents search_kb returned),
`steps` (each tool call with its result or refusal) and `stop_reason`. It acts for the
customer the API key is bound to (`<key> <customer_id>` in the keys; 403 for a key bound to
none, or without keys): the tools see only that customer's orders. Write tools stay guarded
as in `agent_eval` (asked for in the request, schema-checked, idempotent, at most
`agent_eval.max_writes` rows) and act on a per-request copy of the database unless
`AgentSettings.persist_writes`. Listed in
/v1/models only when `veritune.agent` imports and the database exists (else 501 / 503).

Generation is greedy (temperature and top_p are accepted and ignored). Who generates is
`serve.backend`: `builtin` decodes concurrent requests together, in micro-batches on a CPU
(`MicroBatcher` + `generate_batch`, veritune/batching.py) and by continuous batching with CUDA
graphs on a GPU (`serve.engine`, veritune/engine.py); `upstream` sends the rendered prompt to an
OpenAI-compatible engine at `serve.upstream_url` (veritune/upstream.py: 502 / 503 / 504 when it
fails) and keeps retrieval, the agent, keys, limits and metrics here. Retrieval queries are
batched too, so a batch's questions are embedded and searched in one call.

Security: API keys come from `VERITUNE_API_KEYS` (comma-separated) or the file named by
`VERITUNE_API_KEYS_FILE` (one per line, optionally followed by the customer id the key acts
for) and are compared in constant time; without keys the server only binds to loopback.
Each key (each client address without keys) has a token-bucket rate limit; failed
authentications are limited per client address (`serve.auth_failures_per_min`, then 429).
Request headers must arrive within `serve.header_timeout_s` (`header_deadline_protocol`)
and the body within `serve.body_timeout_s` (`RequestGuard`), else 408 and close. Logs carry method, path, status, latency and request id, never a prompt or a key.
Bodies over `serve.max_body_bytes` get 413 before they are parsed; bad input gets a 4xx whose
message names the field.

This process owns the Milvus Lite index directory while it runs (one process at a time).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import ipaddress
import json
import logging
import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.exceptions import HTTPException

from veritune import chat
from veritune.batching import BatcherStopped, Completion, GenerationRequest, MicroBatcher, QueueFull, generate_batch
from veritune.config import PARAMS_FILE, AgentDbParams, AgentEvalParams, BuildSftParams, ServeParams, load_params

log = logging.getLogger("veritune.serve")

KEYS_ENV, KEYS_FILE_ENV = "VERITUNE_API_KEYS", "VERITUNE_API_KEYS_FILE"
# Control tokens a client could type to forge a turn (prompt injection through the template).
_RESERVED = re.compile(r"<\|(?:begin_of_text|end_of_text|start_header_id|end_header_id|eot_id|eom_id|python_tag|"
                       r"im_start|im_end|endoftext|"
                       r"finetune_right_pad_id|reserved_special_token_\d+)\|>")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
AGENT_DB = "data/agent/business.sqlite"  # the shop database of the agent mode (built by `agent_db`)


# --------------------------------------------------------------------------- request schema


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: StrictStr | Annotated[list[TextPart], Field(min_length=1, max_length=64)]
    name: StrictStr | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ChatRequest(BaseModel):
    """The OpenAI chat-completions request; unknown fields are ignored, known ones are strict."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    stream: StrictBool = False
    temperature: Annotated[StrictFloat | StrictInt, Field(ge=0, le=2)] | None = None
    top_p: Annotated[StrictFloat | StrictInt, Field(ge=0, le=1)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=1)] = 1
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    user: StrictStr | None = None
    retrieval: StrictBool | None = None  # veritune extension: None = the server's default (serve.retrieval)


class CompletionRequest(BaseModel):
    """OpenAI's completions request (one prompt string), with vLLM's `skip_special_tokens` and
    `stop_token_ids` (the server's own end-of-turn tokens end a completion either way)."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    prompt: StrictStr
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    stream: StrictBool = False
    temperature: Annotated[StrictFloat | StrictInt, Field(ge=0, le=2)] | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    skip_special_tokens: StrictBool = True
    stop_token_ids: Annotated[list[StrictInt], Field(max_length=16)] | None = None


class ApiError(HTTPException):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.param = param


def error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 408: "timeout_error", 413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


# --------------------------------------------------------------------------- keys and limits


def _key_entries(environ: dict | None = None) -> list[tuple[str, str | None]]:
    """(key, customer id or None) from VERITUNE_API_KEYS (comma-separated entries) and/or the
    file VERITUNE_API_KEYS_FILE names (one entry a line). An entry is `<key>` or
    `<key> <customer_id>`: a key bound to a customer may use the agent mode, which acts on
    that customer's orders only."""
    environ = os.environ if environ is None else environ
    entries = [e.strip() for e in environ.get(KEYS_ENV, "").split(",") if e.strip()]
    path = environ.get(KEYS_FILE_ENV)
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{KEYS_FILE_ENV}={path}: no such file (one API key per line, "
                                    "optionally followed by the customer id it acts for)")
        entries += [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()
                    if line.strip() and not line.startswith("#")]
    out = []
    for entry in entries:
        parts = entry.split()
        if len(parts) > 2:
            raise ValueError("an API key entry is `<key>` or `<key> <customer_id>`; one has "
                             f"{len(parts)} fields (keys must not contain spaces)")
        out.append((parts[0], parts[1] if len(parts) == 2 else None))
    if any(len(k) < 16 for k, _ in out):
        raise ValueError("API keys must be at least 16 characters (e.g. `python -c 'import secrets; "
                         "print(secrets.token_urlsafe(32))'`)")
    return out


def load_api_keys(environ: dict | None = None) -> list[str]:
    """Keys from VERITUNE_API_KEYS (comma-separated) and/or the file VERITUNE_API_KEYS_FILE names."""
    return [key for key, _ in _key_entries(environ)]


def load_key_customers(environ: dict | None = None) -> dict[str, str]:
    """key -> the customer id it is bound to, for the keys that are bound (see `_key_entries`)."""
    return {key: customer for key, customer in _key_entries(environ) if customer is not None}


def unknown_customers(customers: dict[str, str], db_path: str | Path) -> list[str]:
    """The customer ids keys are bound to that the shop database does not know (a typo in the
    keys file would otherwise read as a customer without orders)."""
    import sqlite3

    conn = sqlite3.connect(f"file:{Path(db_path).resolve()}?mode=ro", uri=True)
    try:
        known = {row[0] for row in conn.execute("SELECT customer_id FROM customers")}
    finally:
        conn.close()
    return sorted(set(customers.values()) - known)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def match_key(presented: str, keys: list[str]) -> int | None:
    """Index of the key equal to `presented`; every key is compared, each in constant time."""
    found = None
    for i, key in enumerate(keys):
        if hmac.compare_digest(presented.encode("utf-8"), key.encode("utf-8")):
            found = i
    return found


class RateLimiter:
    """A token bucket per client: `per_min` requests a minute, bursts up to `per_min`."""

    def __init__(self, per_min: int):
        self.per_min = per_min
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last refill time)
        self._lock = threading.Lock()

    def blocked_for(self, client: str) -> float:
        """Seconds until `client` has a request left (0: it has one); counts nothing."""
        if self.per_min <= 0:
            return 0.0
        rate = self.per_min / 60.0
        with self._lock:
            tokens, last = self._buckets.get(client, (float(self.per_min), time.monotonic()))
        tokens = min(float(self.per_min), tokens + (time.monotonic() - last) * rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / rate

    def retry_after(self, client: str) -> float:
        """0 if the request may go ahead (and is counted), else seconds until it may."""
        if self.per_min <= 0:
            return 0.0
        rate = self.per_min / 60.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client, (float(self.per_min), now))
            tokens = min(float(self.per_min), tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[client] = (tokens - 1.0, now)
                return 0.0
            self._buckets[client] = (tokens, now)
            return (1.0 - tokens) / rate


# --------------------------------------------------------------------------- the service


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("veritune_http_requests", "HTTP requests answered", ["method", "path", "status"],
                                registry=r)
        self.latency = Histogram("veritune_http_request_duration_seconds", "HTTP request latency", ["path"],
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)
        self.in_flight = Gauge("veritune_http_in_flight_requests", "requests being handled", registry=r)
        self.batch_size = Histogram("veritune_batch_size", "requests per batch", ["stage"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.batch_seconds = Histogram("veritune_batch_duration_seconds", "time per batch", ["stage"],
                                       buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.completions = Counter("veritune_completions", "chat completions finished", ["finish_reason"],
                                   registry=r)
        self.prompt_tokens = Counter("veritune_prompt_tokens", "prompt tokens processed", registry=r)
        self.completion_tokens = Counter("veritune_completion_tokens", "tokens generated", registry=r)


@dataclasses.dataclass(frozen=True)
class AgentSettings:
    """What the agent mode runs with; `agent_settings` reads them from params.yaml."""

    db_path: str = AGENT_DB
    system_prompt: str = BuildSftParams.agent_system_prompt
    tool_definitions: str = BuildSftParams.agent_tool_definitions  # "compact" or "json_schema"
    search_k: int = BuildSftParams.agent_search_k  # passages per search_kb call (at most serve.retrieval_k)
    today: str = AgentDbParams.today
    max_steps: int = AgentEvalParams.max_steps
    max_retries: int = AgentEvalParams.max_retries
    max_seconds: float = AgentEvalParams.max_seconds  # capped by serve.request_timeout_s
    constrained_calls: bool = AgentEvalParams.constrained_calls  # tool calls under the tools' JSON-schema grammar
    max_string_chars: int = AgentEvalParams.max_string_chars  # constrained calls: longest free-text argument
    max_writes: int = AgentEvalParams.max_writes  # rows one request may write (tickets, refunds)
    persist_writes: bool = False  # False: writes act on a per-request copy; True: on db_path itself


def agent_settings(params_file: str | Path = PARAMS_FILE, db_path: str = AGENT_DB) -> AgentSettings:
    """The agent's prompt and limits as `agent_eval` runs it: `build_sft` (system prompt, tool
    definitions, search size), `agent_db` (today) and `agent_eval` (steps, retries, seconds)."""
    sp, ap, ep = (load_params(s, params_file) for s in ("build_sft", "agent_db", "agent_eval"))
    return AgentSettings(db_path=db_path, system_prompt=sp.agent_system_prompt,
                         tool_definitions=sp.agent_tool_definitions, search_k=sp.agent_search_k, today=ap.today,
                         max_steps=ep.max_steps, max_retries=ep.max_retries, max_seconds=ep.max_seconds,
                         constrained_calls=ep.constrained_calls, max_string_chars=ep.max_string_chars,
                         max_writes=ep.max_writes)


class Service:
    """The loaded model and tokenizer, the retriever, and the two batchers that feed them."""

    def __init__(self, params: ServeParams, model, tokenizer, retriever=None, system_prompt: str = "",
                 api_keys: list[str] | None = None, agent: AgentSettings = AgentSettings(),
                 customers: dict[str, str] | None = None, max_positions: int | None = None):
        from veritune.generation import stop_token_ids

        self.params, self.model, self.tokenizer, self.retriever = params, model, tokenizer, retriever
        self.system_prompt, self.agent = system_prompt, agent
        self.api_keys = list(api_keys or [])
        # The customer each key acts for in the agent mode (by key index); unbound keys have none.
        self.key_customers = {i: (customers or {})[k] for i, k in enumerate(self.api_keys) if k in (customers or {})}
        self.stop_ids = stop_token_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id
        if max_positions is None:
            max_positions = int(getattr(model.config, "max_position_embeddings", 1 << 30)) if model is not None else 1 << 30
        self.max_positions = max_positions
        self.metrics = Metrics()
        self.limiter = RateLimiter(params.rate_limit_per_min)
        self.auth_failures = RateLimiter(params.auth_failures_per_min)  # per client address
        self.upstream, self.generator, self.engine = None, None, None
        if params.backend == "upstream":
            from veritune.upstream import UpstreamClient

            self.upstream = UpstreamClient(params.upstream_url, params.upstream_model, params.request_timeout_s,
                                           self.stop_ids)
            self.engine = "upstream"
        elif engine_kind(params, model) == "continuous":
            from veritune.engine import ContinuousBatchingEngine

            self.generator = ContinuousBatchingEngine(model, self.stop_ids, params.max_batch_size,
                                                      params.kv_cache_tokens, params.prefill_tokens,
                                                      max_pending=params.max_pending, name="generate",
                                                      mixed_tokens=params.mixed_tokens)
            self.max_positions = min(self.max_positions, self.generator.positions)
            self.engine = "continuous"
        else:
            self.generator = MicroBatcher(lambda reqs: generate_batch(self.model, reqs, self.stop_ids, self.pad_id),
                                          params.max_batch_size, params.max_wait_ms, params.max_pending,
                                          name="generate")
            self.engine = "micro_batch"
        if self.generator is not None:
            self.generator.on_batch = lambda n, s: self._observe("generate", n, s)
        self.searcher = None
        if retriever is not None:
            self.searcher = MicroBatcher(lambda queries: retriever.search(queries, k=params.retrieval_k),
                                         params.max_batch_size, params.max_wait_ms, params.max_pending, name="search")
            self.searcher.on_batch = lambda n, s: self._observe("search", n, s)
        self._grammar, self._grammar_lock = None, threading.Lock()
        self.started = time.time()
        self.in_flight = 0  # HTTP requests being handled (this one included, for /health)

    def _observe(self, stage: str, n: int, seconds: float) -> None:
        self.metrics.batch_size.labels(stage).observe(n)
        self.metrics.batch_seconds.labels(stage).observe(seconds)

    def start(self) -> "Service":
        if self.generator is not None:
            self.generator.start()
        if self.searcher is not None:
            self.searcher.start()
        return self

    def stop_batchers(self) -> None:
        """Take no new work; finish what is queued."""
        if self.searcher is not None:
            self.searcher.stop()
        if self.generator is not None:
            self.generator.stop()

    def close(self) -> None:
        """Finish queued work, then free the index (its lock) for other processes."""
        self.stop_batchers()
        if self.upstream is not None:
            self.upstream.close()
        if self.retriever is not None:
            self.retriever.close()
            self.retriever = None

    def agent_available(self) -> bool:
        return _agent_entry_point() is not None and Path(self.agent.db_path).is_file()

    # --- what the agent gets: blocking calls through the same batchers (see `agent_completion`)
    def generate_raw(self, prompt_text: str, max_new_tokens: int) -> str:
        """The model's continuation of an already rendered prompt (`agent.episode_prompt`),
        tokenized as `ModelPolicy` does, special tokens kept and the stop token it wrote
        appended, so that `agent.parse_reply` sees the whole call (`<|python_tag|>...<|eom_id|>`,
        `<tool_call>...</tool_call><|im_end|>`)."""
        if self.upstream is not None:
            from veritune.upstream import UpstreamError

            try:
                done = self.upstream.complete_sync(prompt_text, max_new_tokens, keep_special=True)
            except UpstreamError as e:
                raise ApiError(e.status, str(e)) from None
            self.metrics.prompt_tokens.inc(done.prompt_tokens)
            self.metrics.completion_tokens.inc(done.completion_tokens)
            stop = self.tokenizer.decode([done.stop_token_id], skip_special_tokens=False) \
                if done.stop_token_id is not None else ""
            return done.text + stop
        ids = self.tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        grammar = self.call_grammar()
        gen = GenerationRequest(list(ids), max_new_tokens,
                                constraint=grammar.constraint() if grammar is not None else None)
        try:
            completion = self.generator.submit(gen).result(self.params.request_timeout_s)
        finally:
            gen.cancelled.set()  # a no-op once finished; frees the batch slot of one given up on
        self.metrics.prompt_tokens.inc(completion.prompt_tokens)
        self.metrics.completion_tokens.inc(len(completion.token_ids))
        stop = [completion.stop_token_id] if completion.stop_token_id is not None else []
        return self.tokenizer.decode(completion.token_ids + stop, skip_special_tokens=False)

    def call_grammar(self):
        """The tool-call grammar (`veritune.constrained`) when the agent mode constrains calls;
        compiled on first use (it reads the whole vocabulary), then shared by every request."""
        if not self.agent.constrained_calls or self.model is None:
            return None  # an upstream decodes calls freely: the grammar needs this process's logits
        with self._grammar_lock:
            if self._grammar is None:
                from veritune.constrained import ToolCallGrammar

                self._grammar = ToolCallGrammar(self.tokenizer, self.model.config.vocab_size,
                                                max_string_chars=self.agent.max_string_chars)
        return self._grammar

    def kb_search(self, query: str) -> list[dict]:
        """`search_kb` for the agent: the top `agent.search_k` passages as the tool returns them."""
        hits = self.searcher.submit(query).result(self.params.request_timeout_s)
        return [{"doc_id": h.doc_id, "title": h.title, "text": h.text} for h in hits[: self.agent.search_k]]


def engine_kind(params: ServeParams, model) -> str:
    """`serve.engine`, with auto resolved: continuous batching where the model is on CUDA and
    the engine runs it (veritune.engine.supported), micro-batches elsewhere."""
    if params.engine != "auto":
        return params.engine
    from veritune.engine import supported

    on_cuda = next(model.parameters()).device.type == "cuda"
    return "continuous" if on_cuda and supported(model) is None else "micro_batch"


def load_service(params: ServeParams, index_params=None, system_prompt: str = "", api_keys: list[str] | None = None,
                 retrieval: bool | None = None, agent: AgentSettings = AgentSettings(),
                 customers: dict[str, str] | None = None) -> Service:
    """Load the model (adapter merged; with `serve.backend: upstream` only its tokenizer) and
    open the index named by `index_params`."""
    import torch

    from veritune.modeling import load_model, load_tokenizer

    if params.torch_threads:
        torch.set_num_threads(params.torch_threads)
    for name in ("base_dir", "adapter_dir"):
        path = getattr(params, name)
        if path and not Path(path).is_dir():
            raise FileNotFoundError(f"serve.{name} {path} does not exist: run `dvc repro train` (or set serve.{name})")
    retriever = None
    if (params.retrieval if retrieval is None else retrieval) and index_params is not None:
        from veritune.retrieval import open_retriever

        retriever = open_retriever(index_params)
    if params.backend == "upstream":
        # The prompt is rendered and counted here, in the checkpoint's own format; the weights stay upstream.
        tokenizer_dir = params.adapter_dir if params.adapter_dir and \
            (Path(params.adapter_dir) / "tokenizer_config.json").exists() else params.base_dir
        tokenizer = load_tokenizer(tokenizer_dir)
        positions = None
        if (Path(params.base_dir) / "config.json").exists():
            from transformers import AutoConfig

            positions = int(getattr(AutoConfig.from_pretrained(params.base_dir), "max_position_embeddings", 1 << 30))
        return Service(params, None, tokenizer, retriever, system_prompt, api_keys, agent, customers,
                       max_positions=positions)
    model = load_model(params.base_dir)
    if params.adapter_dir:
        from peft import PeftModel

        # Merged once at load: the same function, no per-layer adapter cost per token.
        model = PeftModel.from_pretrained(model, params.adapter_dir).merge_and_unload()
    if params.dtype != "auto":
        model = model.to(getattr(torch, params.dtype))
    model.eval()
    tokenizer = load_tokenizer(params.adapter_dir or params.base_dir)
    return Service(params, model, tokenizer, retriever, system_prompt, api_keys, agent, customers)


# --------------------------------------------------------------------------- request guard (ASGI)


class RequestGuard:
    """Request id, body-size limit, body deadline, access log and HTTP metrics around every request.

    The body is read (up to the limit) before the app sees it, so an oversized one gets 413
    however it is sent (Content-Length or chunked) and nothing is parsed. It must arrive
    within `serve.body_timeout_s` of the headers, else 408 and the connection is closed; a
    request counts as in flight only once its body is in, so a stalled upload never holds a
    slot. A client that goes away mid-body is logged as 499 (client closed), not as an error.
    """

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        path = scope["path"] if scope["path"] in _PATHS else "other"
        status = {"code": 500}
        metrics = self.service.metrics
        counted = False

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                   (b"x-request-id", request_id.encode("latin-1"))]}
            await send(message)

        async def reject(code: int, message: str, close: bool = False) -> None:
            response = JSONResponse(error_body(code, message), status_code=code,
                                    headers={"Connection": "close"} if close else None)
            await response(scope, receive, send_with_id)

        try:
            p = self.service.params
            limit = p.max_body_bytes
            declared = headers.get(b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                code = 413 if declared.isdigit() else 400
                return await reject(code, f"request body is {declared.decode('latin-1')} bytes; the limit is {limit}"
                                    if code == 413 else "Content-Length must be a whole number of bytes")
            body, more = bytearray(), True
            deadline = time.monotonic() + p.body_timeout_s
            while more:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    # The rest of a half-sent body would be read as the next request: close.
                    return await reject(408, f"the request body did not arrive within {p.body_timeout_s:g} s "
                                             "(serve.body_timeout_s); send it whole, or raise the limit", close=True)
                if message["type"] == "http.disconnect":
                    status["code"] = 499  # the client went away before its request was complete
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > limit:
                    return await reject(413, f"request body is over the limit of {limit} bytes")
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": bytes(body), "more_body": False}
                return await receive()  # after the body: wait for the client to go away

            metrics.in_flight.inc()
            self.service.in_flight += 1
            counted = True
            await self.app(scope, replay, send_with_id)
        finally:
            if counted:
                metrics.in_flight.dec()
                self.service.in_flight -= 1
            elapsed = time.perf_counter() - started
            metrics.requests.labels(scope["method"], path, str(status["code"])).inc()
            metrics.latency.labels(path).observe(elapsed)
            log.info("%s %s %d %.1fms id=%s", scope["method"], path, status["code"], elapsed * 1000, request_id)


def header_deadline_protocol(service: Service):
    """uvicorn's h11 protocol with a deadline on request headers (uvicorn has none: its
    keep-alive timer stops at the first byte, so a client trickling a header holds the
    connection for ever). The headers of each request must be complete within
    `serve.header_timeout_s` of the connection opening, or of the previous response; else
    the client gets 408 and the connection is closed. Such a client never reaches the app,
    so it holds no in-flight slot; it is counted as path "other", status 408."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    timeout = service.params.header_timeout_s
    body = json.dumps(error_body(408, f"the request headers did not arrive within {timeout:g} s "
                                      "(serve.header_timeout_s)")).encode()
    response = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    class HeaderDeadlineProtocol(H11Protocol):
        _header_timer = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(timeout, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # a whole request line and headers are in
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm()  # the next request on this keep-alive connection

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a response is still being written; its end re-arms the deadline
            self.transport.write(response)
            self.transport.close()
            service.metrics.requests.labels("-", "other", "408").inc()
            log.info("- other 408 headers not complete within %gs", timeout)

    return HeaderDeadlineProtocol


_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/openapi.json", "/docs"}


# --------------------------------------------------------------------------- the app


def create_app(service: Service, owns_service: bool = False) -> RequestGuard:
    """The ASGI app over a started `service`; `owns_service` closes it when the app shuts down."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        if owns_service:
            service.close()

    app = FastAPI(title="veritune", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible chat completions over the fine-tuned, retrieval-grounded model.")
    p = service.params

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(error_body(400, f"request body is not valid JSON: {errors[0].get('msg')}"),
                                status_code=400)
        parts = []
        for e in errors[:10]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
        first = ".".join(str(x) for x in errors[0].get("loc", ()) if x != "body") if errors else None
        return JSONResponse(error_body(422, "; ".join(parts), param=first or None), status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse(error_body(exc.status_code, str(exc.detail), getattr(exc, "param", None)),
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        rid = request.scope.get("state", {}).get("request_id")
        log.error("unhandled %s on %s id=%s", type(exc).__name__, request.url.path, rid, exc_info=exc)
        return JSONResponse(error_body(500, f"internal error (request id {rid})"), status_code=500)

    def authorize(request: Request) -> str:
        """The client's rate-limit identity; raises 401 / 429. The customer the key is bound to
        (None: unbound, or no keys) goes to request.scope["state"]["customer_id"]."""
        address = request.client.host if request.client else "unknown"
        request.scope["state"]["customer_id"] = None
        if service.api_keys:
            # An address that failed too often is refused before its key is looked at: a right
            # guess then reads like a wrong one, so a burst learns nothing.
            wait = service.auth_failures.blocked_for(address)
            if wait > 0:
                raise ApiError(429, f"too many failed authentications from this address; retry in {wait:.0f} s",
                               headers={"Retry-After": str(max(1, round(wait)))})
            auth = request.headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            index = match_key(token.strip(), service.api_keys) if scheme.lower() == "bearer" else None
            if index is None:
                service.auth_failures.retry_after(address)  # counts the failure
                raise ApiError(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                               headers={"WWW-Authenticate": "Bearer"})
            client = f"key-{index}"
            request.scope["state"]["customer_id"] = service.key_customers.get(index)
        else:
            client = f"addr-{address}"
        wait = service.limiter.retry_after(client)
        if wait > 0:
            raise ApiError(429, f"rate limit of {p.rate_limit_per_min} requests a minute exceeded; retry in "
                                f"{wait:.1f} s", headers={"Retry-After": str(max(1, round(wait)))})
        return client

    @app.get("/health")
    async def health() -> dict:
        gen = service.generator
        stats = gen.batch_stats() if gen is not None else {"batches": 0, "max_batch_size_seen": 0,
                                                           "mean_batch_size": 0.0}
        out = {"status": "ok", "model": p.model_name, "retrieval": service.searcher is not None,
               "engine": service.engine, "in_flight": service.in_flight,
               "pending": gen.pending() if gen is not None else 0, **stats,
               "uptime_s": round(time.time() - service.started, 1)}
        if service.upstream is not None:
            out["upstream"] = service.upstream.url
        return out

    @app.get("/metrics")
    async def metrics(request: Request):
        if service.api_keys:
            authorize(request)
        return PlainTextResponse(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        ids = [p.model_name] + ([f"{p.model_name}-agent"] if service.agent_available() else [])
        return {"object": "list", "data": [{"id": i, "object": "model", "created": int(service.started),
                                            "owned_by": "veritune"} for i in ids]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        authorize(request)
        request_id = request.scope["state"]["request_id"]
        messages = check_messages(body, p)
        max_new, stops = checked_limits(body.max_completion_tokens or body.max_tokens, body.stop, p)
        if body.model == f"{p.model_name}-agent":
            return await agent_completion(service, body, messages, max_new, request_id,
                                          request.scope["state"]["customer_id"])
        if body.model != p.model_name:
            raise ApiError(404, f"model {body.model!r} does not exist; GET /v1/models lists "
                                f"{p.model_name!r}", param="model")
        own_ids = service.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                        return_dict=False)
        if len(own_ids) > p.max_input_tokens:
            raise ApiError(400, f"the messages are {len(own_ids)} tokens; the limit is {p.max_input_tokens}",
                           param="messages")
        use_retrieval = p.retrieval if body.retrieval is None else body.retrieval
        hits = []
        if use_retrieval:
            if service.searcher is None:
                raise ApiError(400, "retrieval is off on this server (no index loaded); send \"retrieval\": false",
                               param="retrieval")
            question = messages[-1]["content"]
            hits = await wait_for(service.searcher, question, p.request_timeout_s)
            messages = grounded(messages, [dataclasses.asdict(h) for h in hits], service.system_prompt)
        prompt_ids = service.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                           return_dict=False)
        if len(prompt_ids) + max_new > service.max_positions:
            raise ApiError(400, f"prompt ({len(prompt_ids)} tokens with passages) + max_tokens ({max_new}) exceeds "
                                f"the model's {service.max_positions} positions", param="messages")
        citations = [{"doc_id": h.doc_id, "chunk_id": h.chunk_id, "title": h.title, "score": round(h.score, 4)}
                     for h in hits]
        created = int(time.time())
        base = {"id": f"chatcmpl-{request_id}", "created": created, "model": p.model_name}
        if service.upstream is not None:
            prompt_text = service.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return await upstream_chat(service, prompt_text, max_new, stops, base, citations, body.stream)
        gen = GenerationRequest(prompt_ids=list(prompt_ids), max_new_tokens=max_new)
        if body.stream:
            return StreamingResponse(stream_events(service, gen, stops, base, citations),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        completion: Completion = await wait_for(service.generator, gen, p.request_timeout_s, gen)
        text = service.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        text, stopped = apply_stops(text, stops)
        finish = "stop" if stopped else completion.finish_reason
        record_completion(service, completion, finish)
        return {**base, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text.strip()},
                             "finish_reason": finish}],
                "usage": {"prompt_tokens": completion.prompt_tokens,
                          "completion_tokens": len(completion.token_ids),
                          "total_tokens": completion.prompt_tokens + len(completion.token_ids)},
                "citations": citations}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        """Raw prompts in, text out (OpenAI's legacy completions, vLLM's extras `skip_special_tokens`
        and `stop_reason`): what another veritune with `serve.backend: upstream` sends this one."""
        if not p.completions_endpoint or service.generator is None:
            raise ApiError(404, "POST /v1/completions is off on this server (serve.completions_endpoint)")
        authorize(request)
        request_id = request.scope["state"]["request_id"]
        if body.model != p.model_name:
            raise ApiError(404, f"model {body.model!r} does not exist; this server serves {p.model_name!r}",
                           param="model")
        max_new, stops = checked_limits(body.max_tokens, body.stop, p)
        if not body.prompt:
            raise ApiError(400, "prompt is empty", param="prompt")
        ids = service.tokenizer(body.prompt, add_special_tokens=False)["input_ids"]
        if len(ids) + max_new > service.max_positions:
            raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_new}) exceeds the model's "
                                f"{service.max_positions} positions", param="prompt")
        base = {"id": f"cmpl-{request_id}", "created": int(time.time()), "model": p.model_name}
        gen = GenerationRequest(prompt_ids=list(ids), max_new_tokens=max_new)
        skip = body.skip_special_tokens
        if body.stream:
            return StreamingResponse(stream_events(service, gen, stops, base, None, kind="text", skip_special=skip),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        completion: Completion = await wait_for(service.generator, gen, p.request_timeout_s, gen)
        text, stopped = apply_stops(service.tokenizer.decode(completion.token_ids, skip_special_tokens=skip), stops)
        finish = "stop" if stopped else completion.finish_reason
        record_completion(service, completion, finish)
        return {**base, "object": "text_completion",
                "choices": [{"index": 0, "text": text, "finish_reason": finish,
                             "stop_reason": None if stopped else completion.stop_token_id}],
                "usage": {"prompt_tokens": completion.prompt_tokens, "completion_tokens": len(completion.token_ids),
                          "total_tokens": completion.prompt_tokens + len(completion.token_ids)}}

    return RequestGuard(app, service)


def checked_limits(max_tokens: int | None, stop: str | list[str] | None, p: ServeParams) -> tuple[int, list[str]]:
    """A request's token budget (the server's when unset) and stop sequences, or a 400."""
    max_new = max_tokens or p.max_new_tokens
    if max_new > p.max_new_tokens:
        raise ApiError(400, f"max_tokens is {max_new}; this server allows at most {p.max_new_tokens}",
                       param="max_tokens")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise ApiError(400, "stop sequences must not be empty", param="stop")
    return max_new, stops


def check_messages(body: ChatRequest, p: ServeParams) -> list[dict]:
    """The conversation as plain dicts, or a 400 naming the message and what is wrong with it."""
    if len(body.messages) > p.max_messages:
        raise ApiError(400, f"{len(body.messages)} messages; the limit is {p.max_messages}", param="messages")
    out = []
    for i, m in enumerate(body.messages):
        text = m.text()
        if not text.strip():
            raise ApiError(400, f"messages[{i}].content is empty", param=f"messages.{i}.content")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"messages[{i}].content is not valid Unicode (lone surrogate)",
                           param=f"messages.{i}.content") from None
        found = _RESERVED.search(text)
        if found:
            raise ApiError(400, f"messages[{i}].content contains the reserved control token {found.group(0)}",
                           param=f"messages.{i}.content")
        out.append({"role": m.role, "content": text})
    if out[-1]["role"] != "user":
        raise ApiError(400, f"the last message must be from the user, got {out[-1]['role']!r}", param="messages")
    return out


def grounded(messages: list[dict], passages: list[dict], system_prompt: str) -> list[dict]:
    """The conversation with its last user turn replaced by the training-time RAG prompt."""
    rag = chat.rag_messages(system_prompt, messages[-1]["content"], passages)
    history = messages[:-1]
    if not history or history[0]["role"] != "system":
        history = [rag[0], *history]
    return [*history, rag[1]]


def apply_stops(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def record_completion(service: Service, completion: Completion, finish: str) -> None:
    service.metrics.completions.labels(finish).inc()
    service.metrics.prompt_tokens.inc(completion.prompt_tokens)
    service.metrics.completion_tokens.inc(len(completion.token_ids))


async def wait_for(batcher: MicroBatcher, item: Any, timeout: float, gen: GenerationRequest | None = None) -> Any:
    """Submit to a batcher and await the result: 503 when full or stopping, 504 past `timeout`."""
    try:
        future = batcher.submit(item)
    except QueueFull as e:
        raise ApiError(503, f"server busy ({e}); retry shortly", headers={"Retry-After": "1"}) from None
    except BatcherStopped:
        raise ApiError(503, "server is shutting down", headers={"Retry-After": "5"}) from None
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
    except asyncio.TimeoutError:
        raise ApiError(504, f"no answer within {timeout:g} s (serve.request_timeout_s)") from None
    finally:
        if gen is not None:
            gen.cancelled.set()  # a no-op once finished; frees the batch slot of one given up on


async def stream_events(service: Service, gen: GenerationRequest, stops: list[str], base: dict, citations: list | None,
                        kind: str = "chat", skip_special: bool = True):
    """Server-sent events in OpenAI's chunk format: role, content deltas, finish, `[DONE]`
    (`kind` "text": the completions endpoint's chunks, `{"text": ...}`, no role, nothing stripped)."""
    loop = asyncio.get_running_loop()
    tokens: asyncio.Queue = asyncio.Queue()
    gen.on_token = lambda token: loop.call_soon_threadsafe(tokens.put_nowait, token)
    hold = max((len(s) for s in stops), default=1) - 1  # text that may be the start of a stop sequence

    def event(delta: dict, finish: str | None = None, **extra) -> str:
        if kind == "text":
            choice = {"index": 0, "text": delta.get("content", ""), "finish_reason": finish}
            chunk = {**base, "object": "text_completion", "choices": [choice], **extra}
        else:
            chunk = {**base, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    try:
        future = service.generator.submit(gen)
    except (QueueFull, BatcherStopped) as e:
        yield f"data: {json.dumps(error_body(503, f'server busy: {e}'))}\n\n"
        yield "data: [DONE]\n\n"
        return
    done = asyncio.ensure_future(asyncio.wrap_future(future))
    deadline = loop.time() + service.params.request_timeout_s
    if kind == "chat":
        yield event({"role": "assistant", "content": ""}, citations=citations)
    ids: list[int] = []
    sent = 0
    finish = None
    try:
        while finish is None:
            getter = asyncio.ensure_future(tokens.get())
            await asyncio.wait({getter, done}, timeout=max(0.0, deadline - loop.time()),
                               return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                ids.append(getter.result())
            else:
                getter.cancel()
                if not done.done():
                    raise TimeoutError
                while not tokens.empty():  # tokens queued before the future resolved
                    ids.append(tokens.get_nowait())
                finish = done.result().finish_reason
            text = service.tokenizer.decode(ids, skip_special_tokens=skip_special)
            text, stopped = apply_stops(text, stops)
            if stopped:
                finish = "stop"
                gen.cancelled.set()
            # Hold back a partial UTF-8 character and a possible stop-sequence prefix.
            ready = len(text) if finish else max(sent, len(text.rstrip("\ufffd")) - hold)
            if ready > sent:
                yield event({"content": text[sent:ready] if sent or kind == "text" else text[:ready].lstrip()})
                sent = ready
        completion = done.result() if done.done() and not done.exception() else None
        if completion is not None:
            record_completion(service, completion, finish)
        usage = {} if completion is None or kind == "chat" else {"usage": {
            "prompt_tokens": completion.prompt_tokens, "completion_tokens": len(completion.token_ids),
            "total_tokens": completion.prompt_tokens + len(completion.token_ids)}}
        yield event({}, finish, **usage)
    except TimeoutError:
        gen.cancelled.set()
        yield f"data: {json.dumps(error_body(504, 'no answer within serve.request_timeout_s'))}\n\n"
    except Exception:  # the batch failed after the headers went out: say so in-band, then end the stream
        log.exception("stream %s failed", base["id"])
        yield f"data: {json.dumps(error_body(500, 'generation failed; see the server log for ' + base['id']))}\n\n"
    finally:
        gen.cancelled.set()  # also when the client went away mid-stream
    yield "data: [DONE]\n\n"


def upstream_api_error(e) -> ApiError:
    """An `UpstreamError` as veritune's answer: 502 / 504, or 503 with Retry-After when it is busy."""
    return ApiError(e.status, str(e), headers={"Retry-After": "1"} if e.status == 503 else None)


async def upstream_chat(service: Service, prompt_text: str, max_new: int, stops: list[str], base: dict,
                        citations: list, stream: bool):
    """A chat completion generated by the upstream (`serve.backend: upstream`) on the prompt
    rendered here; the answer in the same shape as the built-in backend's, citations included."""
    from veritune.upstream import UpstreamError

    p = service.params
    if not stream:
        try:
            done = await asyncio.wait_for(service.upstream.complete(prompt_text, max_new, stops), p.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, f"the upstream gave no answer within {p.request_timeout_s:g} s "
                                "(serve.request_timeout_s)") from None
        except UpstreamError as e:
            raise upstream_api_error(e) from None
        finish = "length" if done.finish_reason == "length" else "stop"
        service.metrics.completions.labels(finish).inc()
        service.metrics.prompt_tokens.inc(done.prompt_tokens)
        service.metrics.completion_tokens.inc(done.completion_tokens)
        return {**base, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text.strip()},
                             "finish_reason": finish}],
                "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                          "total_tokens": done.prompt_tokens + done.completion_tokens},
                "citations": citations}
    try:  # the upstream's status line first: a dead upstream is a 502, not a broken stream
        response = await asyncio.wait_for(service.upstream.open_stream(prompt_text, max_new, stops),
                                          p.request_timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(504, f"the upstream gave no answer within {p.request_timeout_s:g} s") from None
    except UpstreamError as e:
        raise upstream_api_error(e) from None

    def event(delta: dict, finish: str | None = None, **extra) -> str:
        chunk = {**base, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    async def relay():
        yield event({"role": "assistant", "content": ""}, citations=citations)
        started, finish, usage = False, None, None
        try:
            async for text, reason, used in service.upstream.stream_deltas(response):
                usage = used or usage
                finish = reason or finish
                if not started:
                    text = text.lstrip()
                    started = bool(text)
                if text:
                    yield event({"content": text})
            finish = "length" if finish == "length" else "stop"
            service.metrics.completions.labels(finish).inc()
            if usage:
                service.metrics.prompt_tokens.inc(usage.get("prompt_tokens", 0))
                service.metrics.completion_tokens.inc(usage.get("completion_tokens", 0))
            yield event({}, finish)
        except UpstreamError as e:  # after the headers went out: said in-band, then the stream ends
            yield f"data: {json.dumps(error_body(e.status, str(e)))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(relay(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@functools.cache
def _agent_entry_point():
    """`veritune.agent.run_agent`, or None when this build cannot import it (the agent mode answers 501)."""
    try:
        from veritune.agent import run_agent
    except ImportError as e:
        log.warning("agent mode off: %s", e)
        return None
    return run_agent


async def agent_completion(service: Service, body: ChatRequest, messages: list[dict], max_new: int, request_id: str,
                           customer_id: str | None = None):
    """The agent mode: `run_agent` on the conversation (its last user message is the request) in a
    worker thread, as `customer_id` (the customer the API key is bound to: the tools see only
    their orders); `max_new` bounds each model turn. Model turns go through the generation
    batcher (`Service.generate_raw`), search_kb through the search batcher (`Service.kb_search`)."""
    run_agent = _agent_entry_point()
    if run_agent is None:
        raise ApiError(501, "the agent mode is not available in this server build (veritune.agent does not import)",
                       param="model")
    p, a = service.params, service.agent
    if not Path(a.db_path).is_file():
        raise ApiError(503, f"the agent's shop database {a.db_path} does not exist: run `dvc repro agent_db`",
                       param="model")
    if customer_id is None:
        raise ApiError(403, "the agent mode acts for one customer, and this request is bound to none: give the "
                            f"customer an API key bound to their id (a `<key> <customer_id>` line in {KEYS_FILE_ENV})",
                       param="model")
    from datetime import date

    from veritune.agent import AgentLimits
    from veritune.tools import tool_definitions

    # The episode ends itself before the request times out.
    limits = AgentLimits(a.max_steps, a.max_retries, min(a.max_seconds, p.request_timeout_s))
    try:
        result = await asyncio.wait_for(asyncio.to_thread(
            run_agent, messages, generate=service.generate_raw, customer_id=customer_id, max_writes=a.max_writes,
            search=service.kb_search if service.searcher is not None else None, max_new_tokens=max_new,
            db_path=a.db_path, system_prompt=a.system_prompt, tools=tool_definitions(a.tool_definitions),
            today=date.fromisoformat(a.today), limits=limits, persist_writes=a.persist_writes,
            fmt=chat.chat_format(service.tokenizer)), p.request_timeout_s)
    except TimeoutError:  # the request's own deadline, or one model turn waiting past it
        raise ApiError(504, f"the agent gave no answer within {p.request_timeout_s:g} s") from None
    except QueueFull as e:
        raise ApiError(503, f"server busy ({e}); retry shortly", headers={"Retry-After": "1"}) from None
    except BatcherStopped:
        raise ApiError(503, "server is shutting down", headers={"Retry-After": "5"}) from None
    answer, stop = result["answer"], result["stop"]
    citations = [{"doc_id": doc_id} for doc_id in result["citations"]]
    finish = "stop" if stop == "answer" else "length"
    base = {"id": f"chatcmpl-{request_id}", "created": int(time.time()), "model": f"{p.model_name}-agent"}
    if body.stream:
        async def one_shot():
            chunk = {**base, "object": "chat.completion.chunk", "citations": citations,
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": answer}, "finish_reason": None}]}
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            end = {**base, "object": "chat.completion.chunk", "stop_reason": stop,
                   "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
            yield f"data: {json.dumps(end)}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(one_shot(), media_type="text/event-stream")
    return {**base, "object": "chat.completion", "citations": citations,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": finish}],
            "steps": result["steps"], "stop_reason": stop}


def serve(params: ServeParams, index_params, system_prompt: str, log_level: str = "info",
          agent: AgentSettings = AgentSettings()) -> None:
    """Load everything, then run uvicorn until SIGINT/SIGTERM (which drains in-flight requests)."""
    import uvicorn

    api_keys, customers = load_api_keys(), load_key_customers()
    if customers and Path(agent.db_path).is_file() and unknown_customers(customers, agent.db_path):
        raise ValueError(f"API keys are bound to customers the shop database {agent.db_path} does not have: "
                         f"{', '.join(unknown_customers(customers, agent.db_path))}; fix the `<key> <customer_id>` "
                         f"entries ({KEYS_ENV} / {KEYS_FILE_ENV}) or rebuild the database (`dvc repro agent_db`)")
    if not api_keys and not is_loopback(params.host):
        raise ValueError(f"refusing to serve on {params.host} without API keys: set {KEYS_ENV} or {KEYS_FILE_ENV}, "
                         "or bind to 127.0.0.1")
    log.info("serve: loading %s%s (auth %s)", params.base_dir,
             f" + {params.adapter_dir}" if params.adapter_dir else "", "on" if api_keys else "off (loopback)")
    service = load_service(params, index_params, system_prompt, api_keys, agent=agent, customers=customers).start()
    app = create_app(service, owns_service=True)
    config = uvicorn.Config(app, host=params.host, port=params.port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=int(params.graceful_timeout_s), lifespan="on",
                            http=header_deadline_protocol(service))
    uvicorn.Server(config).run()
