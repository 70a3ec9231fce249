"""Exceptions across the channel: an engine's failure as a reply, and back into the same exception type.

The receiving side maps `kind` through the fixed table below; a kind it does not know becomes an
`EngineError` with the message (it never looks a class up by name).
"""

from __future__ import annotations

from typing import Any

from adapters_store.errors import (
    AdapterStoreError,
    ArtifactInvalid,
    BackboneNotFound,
    DomainNotFound,
    Problem,
    StoreBusy,
    StoreConflict,
    StoreCorrupt,
    StoreQuotaExceeded,
    StoreSymlink,
    StoreUnavailable,
    VersionNotFound,
)
from domain_format.preprocess import CorruptImage
from server import errors
from server.protocol import Message, failure

_PLAIN: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (
        DomainNotFound,
        VersionNotFound,
        BackboneNotFound,
        StoreConflict,
        StoreBusy,
        StoreCorrupt,
        StoreSymlink,
        StoreUnavailable,
        errors.DomainUnavailable,
        errors.EngineError,
        CorruptImage,  # a JPEG the engine decodes (MD_ENGINE_JPEG_DECODE) whose data is not one
    )
}
_SERVER: dict[str, type[errors.ServerError]] = {
    cls.__name__: cls
    for cls in (
        errors.BadRequest,
        errors.DeadlineExceeded,
        errors.NotReady,
        errors.EngineUnavailable,
        errors.StaleVersion,
        errors.NonFiniteOutput,
    )
}


def to_wire(exc: BaseException) -> Message:
    """A failure reply for an exception raised while serving a request."""
    if isinstance(exc, ArtifactInvalid):
        problems = [{"field": p.field, "message": p.message, "code": p.code} for p in exc.problems]
        return failure("ArtifactInvalid", str(exc), problems=problems)
    if isinstance(exc, errors.QueueFull):
        return failure("QueueFull", exc.message, retry_after=exc.retry_after)
    if isinstance(exc, StoreQuotaExceeded):
        return failure("StoreQuotaExceeded", str(exc), limit=exc.limit, value=exc.value)
    if isinstance(exc, errors.ServerError):
        return failure(type(exc).__name__, exc.message, **exc.details)
    name = type(exc).__name__
    if name in _PLAIN or isinstance(exc, AdapterStoreError | errors.EngineError):
        return failure(name if name in _PLAIN else "EngineError", str(exc))
    return failure("EngineError", f"{name}: {exc}")


def from_wire(error: dict[str, Any]) -> Exception:
    kind, message = str(error.get("kind", "")), str(error.get("message", ""))
    details = error.get("details") or {}
    if kind == "ArtifactInvalid":
        problems = [
            Problem(str(p.get("field", "")), str(p.get("message", "")), str(p.get("code", "invalid")))
            for p in details.get("problems", [])
        ]
        return ArtifactInvalid(problems or [Problem("artifact", message)])
    if kind == "QueueFull":
        return errors.QueueFull(message, retry_after=int(details.get("retry_after", 1)))
    if kind == "StoreQuotaExceeded":
        return StoreQuotaExceeded(str(details.get("limit", "")), int(details.get("value", 0)), message)
    if kind in _SERVER:
        return _SERVER[kind](message, **details)
    if kind in _PLAIN:
        return _PLAIN[kind](message)
    return errors.EngineError(message)
