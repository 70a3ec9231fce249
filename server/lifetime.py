"""A classify request's lifetime: its deadline, and whether its client is still there.

Deadline: `MD_REQUEST_TIMEOUT_S` from the moment the whole body has arrived (reading it has its own
deadline, `MD_BODY_TIMEOUT_S`), or less when the client sends `X-Request-Timeout: <seconds>` (a decimal
number of seconds, as `MD_REQUEST_TIMEOUT_S` is; a longer one is capped by the setting). One plain header in seconds rather than gRPC's `grpc-timeout`
unit suffixes: this is a JSON/HTTP API and every other time here is in seconds. When it passes the
request answers 504 `deadline_exceeded` (the server gave up on the request's behalf, as a gateway does),
images not yet decoded are never decoded, and the engine drops its images still queued (the remaining
time travels with them).

Client gone: once the body is read, the ASGI `receive` channel has nothing left to deliver but
`http.disconnect`; a watcher waits on it and cancels the request's work when the client hangs up: its
images not yet decoded are never decoded, its admission (slot, pixels) is given back at once, and an
in-process engine drops its images still queued. The request is counted with status "disconnect".
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.requests import Request

from server.errors import BadRequest, ClientGone, DeadlineExceeded

TIMEOUT_HEADER = "x-request-timeout"


def timeout_for(request: Request, setting_s: float | None) -> float | None:
    """Seconds this request may take: the setting, or the client's shorter `X-Request-Timeout`."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return setting_s
    try:
        asked = float(raw)
    except ValueError:
        asked = math.nan
    if not math.isfinite(asked) or asked <= 0:
        raise BadRequest(f"X-Request-Timeout must be a positive number of seconds, not {raw!r}")
    return asked if setting_s is None else min(asked, setting_s)


class RequestLifetime:
    def __init__(self, request: Request, timeout_s: float | None) -> None:
        self.request = request
        self.timeout_s = timeout_s
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        """On time.monotonic's clock; None: no deadline."""
        self.client_gone = False
        self._task = asyncio.current_task()
        self._watcher: asyncio.Task[None] | None = None

    def remaining(self) -> float | None:
        """Seconds left before the deadline (None: no deadline)."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def should_stop(self) -> bool:
        """Work not yet started for this request should not start."""
        return self.client_gone or self.expired()

    def watch_disconnect(self) -> None:
        """Call once the body has been read: from then on a disconnect cancels the request's work."""
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                self.client_gone = True
                if self._task is not None:
                    self._task.cancel()
                return

    def stop_reason(self) -> Exception:
        if self.client_gone:
            return ClientGone("the client closed its connection before the answer")
        return DeadlineExceeded(self.expired_message())

    def expired_message(self) -> str:
        return f"the request's deadline of {self.timeout_s:g} s passed before it was answered"

    def close(self) -> None:
        # The watcher ends in a CancelledError that its task keeps, with the traceback's frames and, through
        # them, this lifetime: a cycle per request (with the request and its ASGI cycle hanging off it) that
        # only the garbage collector would free. Dropping the lifetime's links to both tasks leaves none.
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        self._task = None


@asynccontextmanager
async def request_lifetime(request: Request, setting_s: float | None) -> AsyncIterator[RequestLifetime]:
    """The request's lifetime: past its deadline the work inside is cancelled and 504 answered; when its
    client goes, the work is cancelled and the request ends as ClientGone."""
    lifetime = RequestLifetime(request, timeout_for(request, setting_s))
    remaining = lifetime.remaining()
    when = None if remaining is None else asyncio.get_running_loop().time() + remaining
    scope = asyncio.timeout_at(when)
    try:
        async with scope:
            yield lifetime
    except TimeoutError:
        if not scope.expired():  # someone else's timeout inside: not the deadline
            raise
        raise DeadlineExceeded(lifetime.expired_message()) from None
    except asyncio.CancelledError:
        if not lifetime.client_gone or lifetime._task is None:
            raise
        lifetime._task.uncancel()  # the watcher's cancel, answered here (as asyncio.timeout does its own)
        raise lifetime.stop_reason() from None
    finally:
        lifetime.close()
