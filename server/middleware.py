"""Pure ASGI middleware (no per-request task or body buffering, unlike BaseHTTPMiddleware).

`BodyLimits` refuses an oversized body while it is being read: at once from Content-Length, or as soon
as the streamed bytes pass the limit, so memory never holds more than the limit. It also reserves every
body's bytes in the front end's body buffer (`server.connection_limits`) before reading them, refusing
with 503 `body_buffer_full` what does not fit (this client's share or the whole buffer).
`RequestRecords` gives every request its `X-Request-Id` (`server.logs`) and echoes it, records the
request's route, domain and status with its latency, logs one line for it (DEBUG; WARNING for a
5xx), and names the front-end process that answered in an `x-md-frontend` header. A client that left
before its answer began (its body cut short) is counted with status "disconnect" and logged at debug
level; one whose body missed the deadline, with the 408 the protocol sent it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.connection_limits import ConnectionGuard
from server.errors import BodyBufferFull, BodyTooLarge
from server.http_errors import error_body
from server.http_metrics import HttpMetrics
from server.http_protocol import REQUEST_EXTENSION
from server.logs import REQUEST_ID_HEADER, BadRequestId, request_id_from, reset_request_id, set_request_id

log = logging.getLogger("server.requests")


class BodyLimits:
    def __init__(
        self, app: ASGIApp, limit_for: Callable[[str], tuple[int, bool]], guard: ConnectionGuard
    ) -> None:
        self.app = app
        self.limit_for = limit_for
        """path -> (its body limit, whether its body counts in the body buffer)"""
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, buffered = self.limit_for(scope["path"])
        declared = 0
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    message = f"the request body ({declared} bytes) exceeds the limit of {limit} bytes"
                    body = error_body(scope["path"], "body_too_large", message, limit=limit)
                    await _refuse(send, 413, body)
                    return
        client = scope.get("client")
        address = str(client[0]) if client else ""
        seen = reserved = 0

        def reserve(nbytes: int) -> None:
            nonlocal reserved
            refusal = self.guard.reserve_body(address, nbytes)
            if refusal is not None:
                raise BodyBufferFull(refusal.message)
            reserved += nbytes

        async def limited_receive() -> Message:
            nonlocal seen
            # Reserved on the first read, not at the request's start: a route reads its body only once
            # its token check passed. The declared length at once (it will all arrive); chunked bodies
            # chunk by chunk.
            if buffered and not reserved and declared > 0:
                reserve(declared)
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(f"the request body exceeds the limit of {limit} bytes", limit=limit)
                if buffered and seen > reserved:
                    reserve(seen - reserved)
            return message

        try:
            await self.app(scope, limited_receive, send)
        finally:
            if reserved:
                self.guard.release_body(address, reserved)


async def _refuse(send: Send, status: int, error: dict[str, object]) -> None:
    body = json.dumps(error).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send(
        {"type": "http.response.start", "status": status, "headers": [*headers, (b"connection", b"close")]}
    )
    await send({"type": "http.response.body", "body": body})


class RequestRecords:
    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self.process_id = str(os.getpid()).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        header = next((v for k, v in scope.get("headers", []) if k == REQUEST_ID_HEADER.encode()), None)
        try:
            request_id = request_id_from(header)
        except BadRequestId as exc:
            await _refuse(send, 400, error_body(scope["path"], "bad_request_id", str(exc)))
            self.metrics.observe_request("unmatched", "", 400, time.perf_counter() - start)
            return
        token = set_request_id(request_id)
        status: int | str = 500
        started = disconnected = False
        # Which front-end process answered: for operators reading logs, and for tests that need a request
        # to cross from one front end to another.
        stamps = [(b"x-request-id", request_id.encode()), (b"x-md-frontend", self.process_id)]

        async def recording_send(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
                message["headers"] = [*message.get("headers", []), *stamps]
            await send(message)

        async def watching_receive() -> Message:
            nonlocal disconnected
            message = await receive()
            if message["type"] == "http.disconnect" and not started:
                disconnected = True
            return message

        try:
            await self.app(scope, watching_receive, recording_send)
        finally:
            if scope.get("extensions", {}).get(REQUEST_EXTENSION, {}).get("timed_out"):
                status = 408  # sent by the protocol (server.http_protocol), not by the app
            elif disconnected:
                status = "disconnect"
            seconds = time.perf_counter() - start
            route = scope.get("route")
            # Labels stay bounded: the route template (not the raw path) and only domains that exist.
            route_label = getattr(route, "path", "unmatched")
            domain = scope.get("state", {}).get("metrics_domain", "")
            self.metrics.observe_request(route_label, domain, status, seconds)
            # One line per request only at DEBUG (at INFO it cost every request a formatted write);
            # server errors stay visible, with the request's ID; a disconnect is DEBUG too.
            level = logging.WARNING if isinstance(status, int) and status >= 500 else logging.DEBUG
            if log.isEnabledFor(level):
                log.log(level, "%s %s %s %.1f ms", scope["method"], scope["path"], status, seconds * 1e3)
            reset_request_id(token)
