"""The HTTP protocol the front ends run under uvicorn: uvicorn's httptools protocol plus read deadlines
and connection limits (`server.connection_limits` holds the limits and the accounting).

Why a protocol class: uvicorn has no deadline for a request's headers or body (only an idle keep-alive
timer, which every byte resets), and ASGI middleware never sees a request before its headers are
complete. A connection here goes through phases, each with its own deadline:

    accept ── idle ──── first byte ── headers ──── body ──── app ── response ── idle ── ...
              MD_KEEP_ALIVE_S         MD_HEADER_TIMEOUT_S    MD_BODY_TIMEOUT_S
              closed, no answer       408 + close            408 + close (the app stops waiting)

and is refused at accept beyond the connection limits (503 for the process's, 429 for one address's),
or, from a trusted proxy, when its headers name a client over its limit (429). Every answer given here
is the API's JSON error (the Open Inference form under /v2), with `Connection: close`; then the write
side is shut and what the client still sends is read and dropped for a moment before the socket
closes, so the client reads the answer instead of a reset. An app's answer leaves in one write, its
head held until its body comes (`_HeadHoldingTransport`): one send and one wake-up of the client each.

Why httptools' protocol rather than h11's: it is the one uvicorn already runs here (its "auto" picks it
when httptools is installed) and its C parser costs the front ends less CPU per request than h11's pure
Python one. Both call the same hooks (connection_made, data_received, on_message_begin,
on_headers_complete, on_body, on_message_complete, on_response_complete, connection_lost), which are
uvicorn internals: pyproject pins uvicorn's minor version, and tests/server/test_connection_limits.py
exercises every hook used.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from typing import Any, ClassVar

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from server.connection_limits import ConnectionGuard
from server.http_errors import error_body

log = logging.getLogger("server.connections")

REQUEST_EXTENSION = "multidomain.request"
"""The key, in each request's ASGI `scope["extensions"]`, of a dict this protocol shares with the app:
`timed_out` is set when its body missed the deadline (the app's metrics then record the 408 sent here)."""

_LINGER_S = 2.0
"""After an answer given here, how long the client's remaining bytes are read and dropped before the
socket closes (closing with unread bytes sends a reset, which can destroy the answer before it is read)."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    guard: ClassVar[ConnectionGuard]
    """Set on the subclass `protocol_class` makes for one app."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # uvicorn's own idle timer (armed after each response, cancelled by any byte), in float seconds.
        self.timeout_keep_alive = self.guard.limits.keep_alive_s  # type: ignore[assignment]
        self._peer = ""
        self._proxy = False
        self._counted = False
        self._answered = False
        """This protocol answered and is closing: nothing more is parsed."""
        self._deadline: asyncio.TimerHandle | None = None
        self._began = 0.0
        self._forwarded: deque[str] = deque()
        """Clients of a trusted proxy's requests in progress, oldest first (counted per address)."""

    # -- connection --------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = _HeadHoldingTransport(transport, self)  # type: ignore[assignment]
        self._peer = self.client[0] if self.client else ""
        self._proxy = self.guard.is_trusted_proxy(self._peer)
        self._began = self.loop.time()
        refusal = self.guard.open_connection(self._peer, proxy=self._proxy)
        if refusal is not None:
            self._answer_and_close(refusal.status, refusal.code, refusal.message)
            return
        self._counted = True
        # Before its first request a connection is idle too (uvicorn arms this only after a response).
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        if self._counted:
            self._counted = False
            self.guard.close_connection(self._peer, proxy=self._proxy)
        while self._forwarded:
            self.guard.close_forwarded_request(self._forwarded.popleft())
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return  # lingering after our answer: dropped
        super().data_received(data)

    # -- request phases ----------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {REQUEST_EXTENSION: {"timed_out": False}}
        self._began = self.loop.time()
        self._arm(self.guard.limits.header_timeout_s, self._headers_late)

    def on_headers_complete(self) -> None:
        self._cancel_deadline()
        if self._proxy:
            forwarded = b", ".join(v for n, v in self.headers if n == b"x-forwarded-for")
            client = self.guard.forwarded_client(self._peer, forwarded.decode("latin-1"))
            refusal = self.guard.open_forwarded_request(client)
            if refusal is not None:
                self._answer_and_close(refusal.status, refusal.code, refusal.message)
                return
            self._forwarded.append(client)
            self.scope["client"] = (client, 0)
        super().on_headers_complete()
        self._arm(self.guard.limits.body_timeout_s, self._body_late)

    def on_body(self, body: bytes) -> None:
        if not self._answered:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._answered:
            return
        self._cancel_deadline()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if self._forwarded:
            self.guard.close_forwarded_request(self._forwarded.popleft())
        super().on_response_complete()

    # -- deadlines -----------------------------------------------------------------------------------------
    def _arm(self, seconds: float, callback: Any) -> None:
        self._cancel_deadline()
        self._deadline = self.loop.call_later(seconds, callback)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_late(self) -> None:
        self._deadline = None
        seconds = self.guard.limits.header_timeout_s
        self._answer_and_close(
            408, "header_timeout", f"the request headers did not arrive within {seconds} s"
        )

    def _body_late(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if cycle is None or cycle.response_started:
            # The app answered without the rest of the body: nothing to add, but the connection cannot
            # carry another request before that body ends.
            self.transport.close()
            return
        cycle.scope["extensions"][REQUEST_EXTENSION]["timed_out"] = True
        # The app's receive() now returns http.disconnect (its request ends; what it sends is dropped).
        cycle.disconnected = True
        cycle.message_event.set()
        seconds = self.guard.limits.body_timeout_s
        message = f"the request body did not arrive within {seconds} s"
        self._answer_and_close(408, "body_timeout", message, observe=False)  # the app's metrics count it

    # -- answers given here --------------------------------------------------------------------------------
    def _answer_and_close(self, status: int, code: str, message: str, *, observe: bool = True) -> None:
        if self._answered or self.transport.is_closing():
            return
        self._answered = True
        self._cancel_deadline()
        self._unset_keepalive_if_required()
        path = self.scope.get("path", "") if self.scope else ""
        body = json.dumps(error_body(path, code, message)).encode()
        head = [
            STATUS_LINE[status],
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n",
        ]
        if status in (429, 503):
            head.append(b"retry-after: 1\r\n")
        self.transport.write(b"".join([*head, b"\r\n", body]))
        log.debug("%s from %s: %s", status, self._peer, message)
        if observe:
            self.guard.observe(status, self.loop.time() - self._began)
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.flow.resume_reading()  # to see the client's EOF (then the transport closes)
            self._deadline = self.loop.call_later(_LINGER_S, self.transport.close)
        else:
            self.transport.close()


class _HeadHoldingTransport:
    """The connection's transport, but a response's head is held until its body is written, and both go
    out in one write: one send() and one TCP segment per answer instead of two, so one wake-up of the
    client instead of two. uvicorn writes the head as soon as the app sends `http.response.start` (and
    has no option to join it with the body), hence this wrapper. A head whose body does not follow at
    once (a streamed or HEAD response) is written at the end of this turn of the event loop, or before
    the transport closes or ends its writing."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedHttpToolsProtocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._held = b""
        self._head_of: object = None
        """The request cycle whose head was last written: a cycle's first write once its response has
        started is its head (uvicorn's 100 Continue is written before)."""

    def write(self, data: bytes) -> None:
        if self._held:
            head, self._held = self._held, b""
            self._transport.writelines((head, data))  # one writev(), the body not copied
            return
        cycle = self._protocol.cycle
        if cycle is not None and cycle.response_started and cycle is not self._head_of:
            self._head_of, self._held = cycle, data
            self._protocol.loop.call_soon(self.flush)
            return
        self._transport.write(data)

    def flush(self) -> None:
        if self._held:
            data, self._held = self._held, b""
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._held)

    def __getattr__(self, name: str) -> Any:  # everything else is the transport's own
        return getattr(self._transport, name)


def protocol_class(guard: ConnectionGuard) -> type[GuardedHttpToolsProtocol]:
    """The protocol class for uvicorn's `Config(http=...)`, bound to one front end's guard."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"guard": guard})
