"""Answers that go out as they are generated: server-sent events in OpenAI's chunk format, the
stop sequences held back until they can no longer match, and awaiting a batcher's result with
the request's deadline (503 when full or stopping, 504 past `serve.request_timeout_s`)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

from veritune.infer import calc
from veritune.infer.decode import Completion, GenerationRequest
from veritune.serve.batching import BatcherStopped, MicroBatcher, QueueFull
from veritune.serve.schema import ApiError, error_body

if TYPE_CHECKING:
    from veritune.serve.service import Service

log = logging.getLogger("veritune.serve")


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


async def stream_events(
    service: Service,
    gen: GenerationRequest,
    stops: list[str],
    base: dict,
    citations: list | None,
    kind: str = "chat",
    skip_special: bool = True,
):
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
            chunk = {
                **base,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }
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
            await asyncio.wait(
                {getter, done}, timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED
            )
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
            # Hold back a partial UTF-8 character and a possible stop-sequence prefix; in chat,
            # calculator spans go out as their results, an open one once it closes.
            if kind == "chat" and finish:
                text = calc.finish(text)
            text, stable = calc.stable_prefix(text) if kind == "chat" else (text, len(text))
            ready = len(text) if finish else max(sent, min(stable, len(text.rstrip("\ufffd")) - hold))
            if ready > sent:
                yield event({"content": text[sent:ready] if sent or kind == "text" else text[:ready].lstrip()})
                sent = ready
        completion = done.result() if done.done() and not done.exception() else None
        if completion is not None:
            record_completion(service, completion, finish)
        usage = (
            {}
            if completion is None or kind == "chat"
            else {
                "usage": {
                    "prompt_tokens": completion.prompt_tokens,
                    "completion_tokens": len(completion.token_ids),
                    "total_tokens": completion.prompt_tokens + len(completion.token_ids),
                }
            }
        )
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
