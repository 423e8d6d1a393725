"""The agent mode: model `<serve.model_name>-agent` runs the customer's last message through the
tool-using agent (`veritune.agent.loop.run_agent`, the loop `agent_eval` measures, with its
settings and its decoding: `AgentSettings`) over the shop database.

Its model turns go through the same generation batcher as chat requests
(`Service.generate_raw`), `search_kb` through the search batcher. It acts for the customer the
API key is bound to (`<key> <customer_id>` in the keys; 403 for a key bound to none, or
without keys): the tools see only that customer's orders. Write tools stay guarded as in
`agent_eval` and act on a per-request copy of the database unless
`AgentSettings.persist_writes`. 501 when `veritune.agent` does not import in this build, 503
when the database is missing.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi.responses import StreamingResponse

from veritune.core import chat
from veritune.serve.auth import KEYS_FILE_ENV
from veritune.serve.batching import BatcherStopped, QueueFull
from veritune.serve.schema import ApiError, ChatRequest

if TYPE_CHECKING:
    from veritune.serve.service import Service

log = logging.getLogger("veritune.serve")


@functools.cache
def _agent_entry_point():
    """`veritune.agent.loop.run_agent`, or None when this build cannot import it (the agent mode answers 501)."""
    try:
        from veritune.agent.loop import run_agent
    except ImportError as e:
        log.warning("agent mode off: %s", e)
        return None
    return run_agent


async def agent_completion(
    service: Service,
    body: ChatRequest,
    messages: list[dict],
    max_new: int,
    request_id: str,
    customer_id: str | None = None,
):
    """The agent mode: `run_agent` on the conversation (its last user message is the request) in a
    worker thread, as `customer_id` (the customer the API key is bound to: the tools see only
    their orders); `max_new` bounds each model turn. Model turns go through the generation
    batcher (`Service.generate_raw`, sampled from this request's own generator as `agent_eval`
    samples), search_kb through the search batcher (`Service.kb_search`)."""
    run_agent = _agent_entry_point()
    if run_agent is None:
        raise ApiError(
            501, "the agent mode is not available in this server build (veritune.agent does not import)", param="model"
        )
    p, a = service.params, service.agent
    if not Path(a.db_path).is_file():
        raise ApiError(
            503, f"the agent's shop database {a.db_path} does not exist: run `dvc repro agent_db`", param="model"
        )
    if customer_id is None:
        raise ApiError(
            403,
            "the agent mode acts for one customer, and this request is bound to none: give the "
            f"customer an API key bound to their id (a `<key> <customer_id>` line in {KEYS_FILE_ENV})",
            param="model",
        )
    from veritune.agent.loop import AgentLimits
    from veritune.agent.specs import tool_definitions

    # The episode ends itself before the request times out.
    limits = AgentLimits(a.max_steps, a.max_retries, min(a.max_seconds, p.request_timeout_s))
    sampler = service.sampler()

    def generate(prompt: str, max_new_tokens: int) -> str:
        return service.generate_raw(prompt, max_new_tokens, sampler)

    try:
        result = await asyncio.wait_for(
            asyncio.to_thread(
                run_agent,
                messages,
                generate=generate,
                customer_id=customer_id,
                max_writes=a.max_writes,
                search=service.kb_search if service.searcher is not None else None,
                max_new_tokens=max_new,
                db_path=a.db_path,
                system_prompt=a.system_prompt,
                tools=tool_definitions(a.tool_definitions),
                today=date.fromisoformat(a.today),
                limits=limits,
                persist_writes=a.persist_writes,
                fmt=chat.chat_format(service.tokenizer),
            ),
            p.request_timeout_s,
        )
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
            chunk = {
                **base,
                "object": "chat.completion.chunk",
                "citations": citations,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": answer}, "finish_reason": None}],
            }
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            end = {
                **base,
                "object": "chat.completion.chunk",
                "stop_reason": stop,
                "choices": [{"index": 0, "delta": {}, "finish_reason": finish}],
            }
            yield f"data: {json.dumps(end)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(one_shot(), media_type="text/event-stream")
    return {
        **base,
        "object": "chat.completion",
        "citations": citations,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": finish}],
        "steps": result["steps"],
        "stop_reason": stop,
    }
