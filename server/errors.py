"""The server's own exception types. `server.http_errors` maps them (and the store's and the image
decoder's) to HTTP answers in one place.

Each carries a stable machine-readable `code` and the HTTP `status` it stands for, so the mapping is data.
"""

from __future__ import annotations

from typing import Any


class ServerError(Exception):
    """Base class: a request the server refuses, with the status and code it answers with."""

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class MissingDomain(ServerError):
    status, code = 400, "missing_domain"


class BadRequest(ServerError):
    status, code = 400, "bad_request"


class Unauthorized(ServerError):
    status, code = 401, "unauthorized"


class Forbidden(ServerError):
    status, code = 403, "forbidden"


class BodyTooLarge(ServerError):
    status, code = 413, "body_too_large"


class UnsupportedMediaType(ServerError):
    status, code = 415, "unsupported_media_type"


class QueueFull(ServerError):
    """Backpressure: the inference queue is full; the client should retry after `retry_after` seconds."""

    status, code = 429, "queue_full"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message, retry_after=retry_after)
        self.retry_after = retry_after


class BodyBufferFull(ServerError):
    """The front end's body buffer (or this client's share of it) cannot hold the request's body: 503,
    not 429, because the buffer is the server's, shared by every client, not a rate this client passed;
    refused at once rather than left waiting, so memory stays bounded and the client (or its balancer)
    can retry here or elsewhere after `retry_after` seconds."""

    status, code = 503, "body_buffer_full"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message, retry_after=retry_after)
        self.retry_after = retry_after


class DeadlineExceeded(ServerError):
    """The request's deadline (`MD_REQUEST_TIMEOUT_S`, or the client's shorter `X-Request-Timeout`)
    passed before it was answered; the work it had not started is dropped."""

    status, code = 504, "deadline_exceeded"


class ClientGone(ServerError):
    """The client closed its connection before the answer: nothing is sent (the request log and metrics
    count it with status "disconnect")."""

    status, code = 499, "client_closed_request"


class NotReady(ServerError):
    status, code = 503, "not_ready"


class EngineUnavailable(ServerError):
    """The engine process is down (restarting) or draining: the request was not served; retry."""

    status, code = 503, "engine_unavailable"


class StaleVersion(ServerError):
    """A front end's cached resolve is out of date (another version was activated, or the domain was
    re-created): the front end resolves again and retries, so a client sees this only after repeated
    races with activations."""

    status, code = 409, "stale_version"


class NonFiniteOutput(ServerError):
    """The network's output for some rows of a batch is NaN or infinite (weights or an input that
    overflow float): those rows fail, never answered with null probabilities; the others are answered.
    `predictions`: the batch's answers, None for the failed rows (engine-side only; not sent)."""

    status, code = 500, "non_finite_output"

    def __init__(self, message: str, predictions: list[Any] | None = None) -> None:
        super().__init__(message)
        self.predictions = predictions or []


class EngineError(Exception):
    """Base class of the engine's own failures (no HTTP meaning of their own)."""


class DomainUnavailable(EngineError):
    """A domain that exists cannot be served by this backbone (its tensors do not fit the bank)."""
