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
off. Chat answers are greedy, as evaluated (temperature and top_p are accepted and ignored);
model `<model_name>-agent` is the agent mode (`veritune.serve.agent_mode`).

The pieces: request schema and bad input (`schema`), keys and rate limits (`auth`), metrics
(`metrics`), the request guard before the app (`guard`), the loaded model and its batchers
(`service`), streaming (`streaming`), an upstream engine (`upstream`), the agent mode
(`agent_mode`); this module wires them into the FastAPI app and runs it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from veritune.core import chat
from veritune.core.params import ServeParams
from veritune.infer import calc
from veritune.infer.decode import Completion, GenerationRequest
from veritune.serve.agent_mode import agent_completion
from veritune.serve.auth import (
    KEYS_ENV,
    KEYS_FILE_ENV,
    is_loopback,
    load_api_keys,
    load_key_customers,
    match_key,
    unknown_customers,
)
from veritune.serve.guard import RequestGuard, header_deadline_protocol
from veritune.serve.schema import ApiError, ChatRequest, CompletionRequest, check_messages, checked_limits, error_body
from veritune.serve.service import AgentSettings, Service, load_service
from veritune.serve.streaming import apply_stops, record_completion, stream_events, wait_for
from veritune.serve.upstream import upstream_chat

log = logging.getLogger("veritune.serve")


def create_app(service: Service, owns_service: bool = False) -> RequestGuard:
    """The ASGI app over a started `service`; `owns_service` closes it when the app shuts down."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        if owns_service:
            service.close()

    app = FastAPI(
        title="veritune",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible chat completions over the fine-tuned, retrieval-grounded model.",
    )
    p = service.params

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(
                error_body(400, f"request body is not valid JSON: {errors[0].get('msg')}"), status_code=400
            )
        parts = []
        for e in errors[:10]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
        first = ".".join(str(x) for x in errors[0].get("loc", ()) if x != "body") if errors else None
        return JSONResponse(error_body(422, "; ".join(parts), param=first or None), status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse(
            error_body(exc.status_code, str(exc.detail), getattr(exc, "param", None)),
            status_code=exc.status_code,
            headers=exc.headers,
        )

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
                raise ApiError(
                    429,
                    f"too many failed authentications from this address; retry in {wait:.0f} s",
                    headers={"Retry-After": str(max(1, round(wait)))},
                )
            auth = request.headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            index = match_key(token.strip(), service.api_keys) if scheme.lower() == "bearer" else None
            if index is None:
                service.auth_failures.retry_after(address)  # counts the failure
                raise ApiError(
                    401,
                    "missing or invalid API key: send `Authorization: Bearer <key>`",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            client = f"key-{index}"
            request.scope["state"]["customer_id"] = service.key_customers.get(index)
        else:
            client = f"addr-{address}"
        wait = service.limiter.retry_after(client)
        if wait > 0:
            raise ApiError(
                429,
                f"rate limit of {p.rate_limit_per_min} requests a minute exceeded; retry in {wait:.1f} s",
                headers={"Retry-After": str(max(1, round(wait)))},
            )
        return client

    @app.get("/health")
    async def health() -> dict:
        gen = service.generator
        stats = (
            gen.batch_stats() if gen is not None else {"batches": 0, "max_batch_size_seen": 0, "mean_batch_size": 0.0}
        )
        out = {
            "status": "ok",
            "model": p.model_name,
            "retrieval": service.searcher is not None,
            "engine": service.engine,
            "in_flight": service.in_flight,
            "pending": gen.pending() if gen is not None else 0,
            **stats,
            "uptime_s": round(time.time() - service.started, 1),
        }
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
        return {
            "object": "list",
            "data": [
                {"id": i, "object": "model", "created": int(service.started), "owned_by": "veritune"} for i in ids
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        authorize(request)
        request_id = request.scope["state"]["request_id"]
        messages = check_messages(body, p)
        max_new, stops = checked_limits(body.max_completion_tokens or body.max_tokens, body.stop, p)
        if body.model == f"{p.model_name}-agent":
            return await agent_completion(
                service, body, messages, max_new, request_id, request.scope["state"]["customer_id"]
            )
        if body.model != p.model_name:
            raise ApiError(
                404, f"model {body.model!r} does not exist; GET /v1/models lists {p.model_name!r}", param="model"
            )
        own_ids = service.tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=False
        )
        if len(own_ids) > p.max_input_tokens:
            raise ApiError(
                400, f"the messages are {len(own_ids)} tokens; the limit is {p.max_input_tokens}", param="messages"
            )
        use_retrieval = p.retrieval if body.retrieval is None else body.retrieval
        hits = []
        if use_retrieval:
            if service.searcher is None:
                raise ApiError(
                    400, 'retrieval is off on this server (no index loaded); send "retrieval": false', param="retrieval"
                )
            question = messages[-1]["content"]
            hits = await wait_for(service.searcher, question, p.request_timeout_s)
            messages = grounded(messages, [dataclasses.asdict(h) for h in hits], service.system_prompt)
        prompt_ids = service.tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=False
        )
        if len(prompt_ids) + max_new > service.max_positions:
            raise ApiError(
                400,
                f"prompt ({len(prompt_ids)} tokens with passages) + max_tokens ({max_new}) exceeds "
                f"the model's {service.max_positions} positions",
                param="messages",
            )
        citations = [
            {"doc_id": h.doc_id, "chunk_id": h.chunk_id, "title": h.title, "score": round(h.score, 4)} for h in hits
        ]
        created = int(time.time())
        base = {"id": f"chatcmpl-{request_id}", "created": created, "model": p.model_name}
        if service.upstream is not None:
            prompt_text = service.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return await upstream_chat(service, prompt_text, max_new, stops, base, citations, body.stream)
        gen = GenerationRequest(prompt_ids=list(prompt_ids), max_new_tokens=max_new)
        if body.stream:
            return StreamingResponse(
                stream_events(service, gen, stops, base, citations),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        completion: Completion = await wait_for(service.generator, gen, p.request_timeout_s, gen)
        text = service.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        text, stopped = apply_stops(text, stops)
        text = calc.finish(text)  # calculator spans -> their results, as evaluate scored them
        finish = "stop" if stopped else completion.finish_reason
        record_completion(service, completion, finish)
        return {
            **base,
            "object": "chat.completion",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text.strip()}, "finish_reason": finish}
            ],
            "usage": {
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": len(completion.token_ids),
                "total_tokens": completion.prompt_tokens + len(completion.token_ids),
            },
            "citations": citations,
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        """Raw prompts in, text out (OpenAI's legacy completions, vLLM's extras `skip_special_tokens`
        and `stop_reason`): what another veritune with `serve.backend: upstream` sends this one."""
        if not p.completions_endpoint or service.generator is None:
            raise ApiError(404, "POST /v1/completions is off on this server (serve.completions_endpoint)")
        authorize(request)
        request_id = request.scope["state"]["request_id"]
        if body.model != p.model_name:
            raise ApiError(
                404, f"model {body.model!r} does not exist; this server serves {p.model_name!r}", param="model"
            )
        max_new, stops = checked_limits(body.max_tokens, body.stop, p)
        if not body.prompt:
            raise ApiError(400, "prompt is empty", param="prompt")
        ids = service.tokenizer(body.prompt, add_special_tokens=False)["input_ids"]
        if len(ids) + max_new > service.max_positions:
            raise ApiError(
                400,
                f"prompt ({len(ids)} tokens) + max_tokens ({max_new}) exceeds the model's "
                f"{service.max_positions} positions",
                param="prompt",
            )
        base = {"id": f"cmpl-{request_id}", "created": int(time.time()), "model": p.model_name}
        gen = GenerationRequest(
            prompt_ids=list(ids),
            max_new_tokens=max_new,
            temperature=float(body.temperature or 0),
            generator=service.seeded(body.seed) if body.temperature else None,
        )
        skip = body.skip_special_tokens
        if body.stream:
            return StreamingResponse(
                stream_events(service, gen, stops, base, None, kind="text", skip_special=skip),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        completion: Completion = await wait_for(service.generator, gen, p.request_timeout_s, gen)
        text, stopped = apply_stops(service.tokenizer.decode(completion.token_ids, skip_special_tokens=skip), stops)
        finish = "stop" if stopped else completion.finish_reason
        record_completion(service, completion, finish)
        return {
            **base,
            "object": "text_completion",
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "finish_reason": finish,
                    "stop_reason": None if stopped else completion.stop_token_id,
                }
            ],
            "usage": {
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": len(completion.token_ids),
                "total_tokens": completion.prompt_tokens + len(completion.token_ids),
            },
        }

    return RequestGuard(app, service)


def grounded(messages: list[dict], passages: list[dict], system_prompt: str) -> list[dict]:
    """The conversation with its last user turn replaced by the training-time RAG prompt."""
    rag = chat.rag_messages(system_prompt, messages[-1]["content"], passages)
    history = messages[:-1]
    if not history or history[0]["role"] != "system":
        history = [rag[0], *history]
    return [*history, rag[1]]


def serve(params: ServeParams, index_params, system_prompt: str, agent: AgentSettings, log_level: str = "info") -> None:
    """Load everything, then run uvicorn until SIGINT/SIGTERM (which drains in-flight requests)."""
    import uvicorn

    api_keys, customers = load_api_keys(), load_key_customers()
    if customers and Path(agent.db_path).is_file() and unknown_customers(customers, agent.db_path):
        raise ValueError(
            f"API keys are bound to customers the shop database {agent.db_path} does not have: "
            f"{', '.join(unknown_customers(customers, agent.db_path))}; fix the `<key> <customer_id>` "
            f"entries ({KEYS_ENV} / {KEYS_FILE_ENV}) or rebuild the database (`dvc repro agent_db`)"
        )
    if not api_keys and not is_loopback(params.host):
        raise ValueError(
            f"refusing to serve on {params.host} without API keys: set {KEYS_ENV} or {KEYS_FILE_ENV}, "
            "or bind to 127.0.0.1"
        )
    log.info(
        "serve: loading %s%s (auth %s)",
        params.base_dir,
        f" + {params.adapter_dir}" if params.adapter_dir else "",
        "on" if api_keys else "off (loopback)",
    )
    service = load_service(params, index_params, system_prompt, api_keys, agent=agent, customers=customers).start()
    app = create_app(service, owns_service=True)
    config = uvicorn.Config(
        app,
        host=params.host,
        port=params.port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=int(params.graceful_timeout_s),
        lifespan="on",
        http=header_deadline_protocol(service),
    )
    uvicorn.Server(config).run()
