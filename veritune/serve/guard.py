"""What stands before the app on every request: request id, body-size limit, header and body
deadlines, access log and HTTP metrics.

Request headers must arrive within `serve.header_timeout_s` (`header_deadline_protocol`) and
the body within `serve.body_timeout_s` (`RequestGuard`), else 408 and close. Bodies over
`serve.max_body_bytes` get 413 before they are parsed. Logs carry method, path, status,
latency and request id, never a prompt or a key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse

from veritune.serve.schema import error_body

if TYPE_CHECKING:
    from veritune.serve.service import Service

log = logging.getLogger("veritune.serve")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/openapi.json", "/docs"}


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
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))],
                }
            await send(message)

        async def reject(code: int, message: str, close: bool = False) -> None:
            response = JSONResponse(
                error_body(code, message), status_code=code, headers={"Connection": "close"} if close else None
            )
            await response(scope, receive, send_with_id)

        try:
            p = self.service.params
            limit = p.max_body_bytes
            declared = headers.get(b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                code = 413 if declared.isdigit() else 400
                return await reject(
                    code,
                    f"request body is {declared.decode('latin-1')} bytes; the limit is {limit}"
                    if code == 413
                    else "Content-Length must be a whole number of bytes",
                )
            body, more = bytearray(), True
            deadline = time.monotonic() + p.body_timeout_s
            while more:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    # The rest of a half-sent body would be read as the next request: close.
                    return await reject(
                        408,
                        f"the request body did not arrive within {p.body_timeout_s:g} s "
                        "(serve.body_timeout_s); send it whole, or raise the limit",
                        close=True,
                    )
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
    body = json.dumps(
        error_body(408, f"the request headers did not arrive within {timeout:g} s (serve.header_timeout_s)")
    ).encode()
    response = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )

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
