"""Generation by another server: any OpenAI-compatible engine behind veritune's API.

    serve:
      backend: upstream
      upstream_url: http://127.0.0.1:8001/v1     # vLLM, SGLang, TGI, llama.cpp's server, or another veritune
      upstream_model: veritune                    # the `model` the upstream serves

veritune keeps everything but the forward passes: retrieval and citations, the prompt in the
checkpoint's own chat format (rendered here with the local tokenizer, exactly as in training),
the agent loop and its tools, keys, rate limits, metrics. The upstream gets the rendered prompt
on `/v1/completions` (chat answers greedy: temperature 0; the agent's turns at its temperature
and seed, `agent_eval`'s; `add_special_tokens: false`, since the rendered prompt carries its
own BOS), so it never applies a chat template of its own, and answers with text. The
end-of-turn tokens are sent as `stop_token_ids` and special tokens are kept in the agent's turns
(`skip_special_tokens: false`), so the agent still sees a call's `<|python_tag|>` and the token
that ended it (`stop_reason`, as vLLM reports it).

Failures are the upstream's, and are said so: unreachable or a broken answer -> 502, no answer
within `serve.request_timeout_s` -> 504, the upstream busy (429 / 503) -> 503 with Retry-After.
The connection pool reconnects by itself, so a restarted upstream is used again at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
from fastapi.responses import StreamingResponse

from veritune.infer import calc
from veritune.serve.schema import ApiError, error_body

if TYPE_CHECKING:
    from veritune.serve.service import Service

log = logging.getLogger(__name__)

API_KEY_ENV = "VERITUNE_UPSTREAM_API_KEY"  # the upstream's key, if it wants one (never in params or logs)


class UpstreamError(RuntimeError):
    """The upstream failed; `status` is what veritune answers (502, 503 or 504)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class UpstreamCompletion:
    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    stop_token_id: int | None = None  # the stop token that ended it, when the upstream says (vLLM's stop_reason)


def completions_url(url: str) -> str:
    """`http://host:port`, `.../v1` or `.../v1/completions` -> the completions endpoint."""
    url = url.rstrip("/")
    if url.endswith("/completions"):
        return url
    return f"{url}/completions" if url.endswith("/v1") else f"{url}/v1/completions"


class UpstreamClient:
    """Completions of rendered prompts from an OpenAI-compatible `/v1/completions` (greedy
    unless a temperature is given)."""

    def __init__(
        self,
        url: str,
        model: str,
        timeout_s: float,
        stop_token_ids: list[int] = (),
        api_key: str | None = None,
        max_connections: int = 256,
    ):
        self.url, self.model, self.timeout_s = completions_url(url), model, timeout_s
        self.stop_token_ids = list(stop_token_ids)
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.timeout = httpx.Timeout(timeout_s, connect=min(5.0, timeout_s))
        self.limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._async: httpx.AsyncClient | None = None
        self._sync = httpx.Client(timeout=self.timeout, limits=self.limits, headers=self.headers)

    def _client(self) -> httpx.AsyncClient:
        if self._async is None:  # made in the server's event loop, on first use
            self._async = httpx.AsyncClient(timeout=self.timeout, limits=self.limits, headers=self.headers)
        return self._async

    def body(
        self,
        prompt: str,
        max_tokens: int,
        stop: list[str],
        stream: bool,
        keep_special: bool,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> dict:
        # add_special_tokens false: the rendered prompt already begins with the template's BOS
        # (vLLM's completions would add a second one).
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": temperature or 0,
            "stream": stream,
            "skip_special_tokens": not keep_special,
            "add_special_tokens": False,
        }
        if temperature > 0 and seed is not None:
            body["seed"] = seed
        if stop:
            body["stop"] = stop
        if self.stop_token_ids:
            body["stop_token_ids"] = self.stop_token_ids
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    async def complete(
        self, prompt: str, max_tokens: int, stop: list[str] = (), keep_special: bool = False
    ) -> UpstreamCompletion:
        try:
            r = await self._client().post(self.url, json=self.body(prompt, max_tokens, list(stop), False, keep_special))
        except httpx.HTTPError as e:
            raise self._transport_error(e) from None
        return self._parse(r)

    def complete_sync(
        self,
        prompt: str,
        max_tokens: int,
        stop: list[str] = (),
        keep_special: bool = False,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> UpstreamCompletion:
        """The same from a worker thread (the agent loop, which samples at its temperature)."""
        try:
            r = self._sync.post(
                self.url, json=self.body(prompt, max_tokens, list(stop), False, keep_special, temperature, seed)
            )
        except httpx.HTTPError as e:
            raise self._transport_error(e) from None
        return self._parse(r)

    async def open_stream(self, prompt: str, max_tokens: int, stop: list[str] = ()) -> httpx.Response:
        """Send a streaming request and wait for the upstream's status line, so that a dead or
        failing upstream is a 502 before veritune sends its own headers."""
        client = self._client()
        request = client.build_request("POST", self.url, json=self.body(prompt, max_tokens, list(stop), True, False))
        try:
            response = await client.send(request, stream=True)
        except httpx.HTTPError as e:
            raise self._transport_error(e) from None
        if response.status_code != 200:
            await response.aread()
            await response.aclose()
            self._parse(response)  # raises the status's error
        return response

    async def stream_deltas(self, response: httpx.Response) -> AsyncIterator[tuple[str, str | None, dict | None]]:
        """(text delta, finish_reason or None, usage or None) per upstream event, until [DONE]."""
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                try:
                    event = json.loads(data)
                except json.JSONDecodeError:
                    raise UpstreamError(502, f"upstream {self.url} sent an event that is not JSON") from None
                if "error" in event:
                    raise UpstreamError(502, f"upstream error: {_message(event)}")
                choice = (event.get("choices") or [{}])[0]
                yield choice.get("text") or "", choice.get("finish_reason"), event.get("usage")
            raise UpstreamError(502, f"upstream {self.url} ended the stream without [DONE]")
        except httpx.HTTPError as e:
            raise self._transport_error(e) from None
        finally:
            await response.aclose()

    def _transport_error(self, e: httpx.HTTPError) -> UpstreamError:
        if isinstance(e, httpx.TimeoutException) and not isinstance(e, httpx.ConnectTimeout):
            return UpstreamError(504, f"upstream {self.url} gave no answer within {self.timeout_s:g} s")
        return UpstreamError(502, f"upstream {self.url} unreachable: {type(e).__name__}: {e}"[:300])

    def _parse(self, r: httpx.Response) -> UpstreamCompletion:
        if r.status_code in (429, 503):
            raise UpstreamError(503, f"upstream busy ({r.status_code}): {_message_of(r)}")
        if r.status_code != 200:
            raise UpstreamError(502, f"upstream answered {r.status_code}: {_message_of(r)}")
        try:
            body = r.json()
            choice = body["choices"][0]
            usage = body.get("usage") or {}
            reason = choice.get("stop_reason")
            return UpstreamCompletion(
                text=choice["text"],
                finish_reason=choice.get("finish_reason") or "stop",
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", 0)),
                stop_token_id=reason if isinstance(reason, int) else None,
            )
        except (ValueError, KeyError, IndexError, TypeError):
            raise UpstreamError(502, f"upstream {self.url} sent no completion: {r.text[:200]!r}") from None

    async def aclose(self) -> None:
        if self._async is not None:
            await self._async.aclose()
            self._async = None

    def close(self) -> None:
        self._sync.close()


def _message(body) -> str:
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err)[:300]
        return str(err)[:300]
    return str(body)[:300]


def _message_of(r: httpx.Response) -> str:
    try:
        return _message(r.json())
    except ValueError:
        return r.text[:300]


# --------------------------------------------------------------------------- chat answers from the upstream


def upstream_api_error(e) -> ApiError:
    """An `UpstreamError` as veritune's answer: 502 / 504, or 503 with Retry-After when it is busy."""
    return ApiError(e.status, str(e), headers={"Retry-After": "1"} if e.status == 503 else None)


async def upstream_chat(
    service: Service, prompt_text: str, max_new: int, stops: list[str], base: dict, citations: list, stream: bool
):
    """A chat completion generated by the upstream (`serve.backend: upstream`) on the prompt
    rendered here; the answer in the same shape as the built-in backend's, citations included."""
    p = service.params
    if not stream:
        try:
            done = await asyncio.wait_for(service.upstream.complete(prompt_text, max_new, stops), p.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(
                504, f"the upstream gave no answer within {p.request_timeout_s:g} s (serve.request_timeout_s)"
            ) from None
        except UpstreamError as e:
            raise upstream_api_error(e) from None
        finish = "length" if done.finish_reason == "length" else "stop"
        service.metrics.completions.labels(finish).inc()
        service.metrics.prompt_tokens.inc(done.prompt_tokens)
        service.metrics.completion_tokens.inc(done.completion_tokens)
        return {
            **base,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": calc.finish(done.text).strip()},
                    "finish_reason": finish,
                }
            ],
            "usage": {
                "prompt_tokens": done.prompt_tokens,
                "completion_tokens": done.completion_tokens,
                "total_tokens": done.prompt_tokens + done.completion_tokens,
            },
            "citations": citations,
        }
    try:  # the upstream's status line first: a dead upstream is a 502, not a broken stream
        response = await asyncio.wait_for(
            service.upstream.open_stream(prompt_text, max_new, stops), p.request_timeout_s
        )
    except asyncio.TimeoutError:
        raise ApiError(504, f"the upstream gave no answer within {p.request_timeout_s:g} s") from None
    except UpstreamError as e:
        raise upstream_api_error(e) from None

    def event(delta: dict, finish: str | None = None, **extra) -> str:
        chunk = {
            **base,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    async def relay():
        yield event({"role": "assistant", "content": ""}, citations=citations)
        finish, usage = None, None
        raw, sent = "", 0  # calculator spans go out as their results, an open one once it closes
        try:
            async for text, reason, used in service.upstream.stream_deltas(response):
                usage = used or usage
                finish = reason or finish
                raw += text
                resolved, stable = calc.stable_prefix(raw.lstrip())
                if stable > sent:
                    yield event({"content": resolved[sent:stable]})
                    sent = stable
            resolved = calc.finish(raw.lstrip())
            if len(resolved) > sent:
                yield event({"content": resolved[sent:]})
            finish = "length" if finish == "length" else "stop"
            service.metrics.completions.labels(finish).inc()
            if usage:
                service.metrics.prompt_tokens.inc(usage.get("prompt_tokens", 0))
                service.metrics.completion_tokens.inc(usage.get("completion_tokens", 0))
            yield event({}, finish)
        except UpstreamError as e:  # after the headers went out: said in-band, then the stream ends
            yield f"data: {json.dumps(error_body(e.status, str(e)))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        relay(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
