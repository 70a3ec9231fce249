"""The one place where exceptions become HTTP answers: `{"error": {"code", "message", ...}}` everywhere,
except under `/v2`, where the Open Inference Protocol's own form `{"error": "message"}` is answered (with
the same statuses and headers).

Covers the server's own errors, the store's, the validator's, the image decoder's, and FastAPI's own
404/405/422.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from adapters_store.errors import (
    AdapterStoreError,
    ArtifactInvalid,
    BackboneNotFound,
    DomainNotFound,
    StoreBusy,
    StoreConflict,
    StoreCorrupt,
    StoreQuotaExceeded,
    StoreSymlink,
    StoreUnavailable,
    VersionNotFound,
)
from domain_format.preprocess import (
    CorruptImage,
    ImageRejected,
    TooCostlyToDecode,
    TooManyPixels,
    TooManyScans,
    UnsupportedImage,
)
from server.errors import DomainUnavailable, EngineError, ServerError

log = logging.getLogger("server")

# Store errors: (status, code). Order matters only for subclasses (none overlap here).
_STORE_STATUS: list[tuple[type[AdapterStoreError], int, str]] = [
    (ArtifactInvalid, 422, "invalid_artifact"),
    (DomainNotFound, 404, "domain_not_found"),
    (VersionNotFound, 404, "version_not_found"),
    (BackboneNotFound, 503, "no_backbone"),
    (StoreConflict, 409, "conflict"),
    # 409, not 413 (the request itself is not too large) nor 507 (a 5xx blames the server): the write
    # conflicts with what the store holds now, and succeeds once the client deletes something.
    (StoreQuotaExceeded, 409, "quota_exceeded"),
    (StoreBusy, 503, "store_busy"),
    (StoreUnavailable, 503, "store_unavailable"),
    (StoreCorrupt, 500, "store_corrupt"),
    # The operator's volume holds a link the store refuses to follow: not the client's fault.
    (StoreSymlink, 500, "store_symlink"),
]

# Images the decoder refuses: (status, code).
_IMAGE_STATUS: list[tuple[type[ImageRejected], int, str]] = [
    (UnsupportedImage, 415, "unsupported_media_type"),
    (TooManyPixels, 413, "too_many_pixels"),
    (TooCostlyToDecode, 413, "too_costly_to_decode"),
    # 422, not 413: the image is small; its structure is what no encoder makes
    (TooManyScans, 422, "too_many_scans"),
    (CorruptImage, 422, "corrupt_image"),
]

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "body_too_large",
    415: "unsupported_media_type",
}


OPEN_INFERENCE_PREFIX = "/v2"


def error_body(path: str, code: str, message: str, **details: Any) -> dict[str, Any]:
    """The error answer for a request to `path`: the protocol's plain string under /v2."""
    if path == OPEN_INFERENCE_PREFIX or path.startswith(OPEN_INFERENCE_PREFIX + "/"):
        problems = details.get("problems")
        if problems:  # the protocol's error is one string: the problems go into it
            message += ": " + "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        return {"error": message}
    return {"error": {"code": code, "message": message, **details}}


def error_response(
    request: Request,
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    **details: Any,
) -> JSONResponse:
    body = error_body(request.url.path, code, message, **details)
    return JSONResponse(body, status_code=status, headers=headers)


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServerError)
    # QueueFull, BodyBufferFull: when to try again
    retry_after = exc.details.get("retry_after")
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    details = {k: v for k, v in exc.details.items() if k != "retry_after"}
    return error_response(request, exc.status, exc.code, exc.message, headers, **details)


async def _store_error(request: Request, exc: Exception) -> JSONResponse:
    status, code = next(((s, c) for cls, s, c in _STORE_STATUS if isinstance(exc, cls)), (500, "store_error"))
    if isinstance(exc, ArtifactInvalid):
        problems = [{"field": p.field, "message": p.message, "code": p.code} for p in exc.problems]
        return error_response(request, 422, code, "the artifact was refused", problems=problems)
    if isinstance(exc, StoreQuotaExceeded):
        return error_response(request, status, code, str(exc), limit=exc.limit, value=exc.value)
    if status >= 500:
        log.error("store failure: %s", exc)
    headers = {"Retry-After": "1"} if isinstance(exc, StoreBusy | StoreUnavailable) else None
    return error_response(request, status, code, str(exc), headers)


async def _image_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ImageRejected)
    status, code = next(((s, c) for cls, s, c in _IMAGE_STATUS if isinstance(exc, cls)), (422, "bad_image"))
    details: dict[str, Any] = {}
    if isinstance(exc, UnsupportedImage):
        details["accepted"] = list(exc.accepted)
    if isinstance(exc, TooManyPixels):
        details["max_pixels"] = exc.max_pixels
    if isinstance(exc, TooManyScans):
        details["max_scans"] = exc.max_scans
    if isinstance(exc, TooCostlyToDecode):
        details["max_decode_bytes"] = exc.max_decode_bytes
    return error_response(request, status, code, exc.message, **details)


async def _engine_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("engine failure: %s", exc)
    code = "domain_unavailable" if isinstance(exc, DomainUnavailable) else "engine_error"
    return error_response(request, 500, code, str(exc))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(request, exc.status_code, code, str(exc.detail), dict(exc.headers or {}) or None)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = [
        {
            "field": ".".join(str(p) for p in err.get("loc", ())),
            "message": err.get("msg", ""),
            "code": err.get("type", ""),
        }
        for err in exc.errors()
    ]
    return error_response(
        request, 422, "invalid_request", "the request does not match the API", problems=problems
    )


async def _client_gone(request: Request, exc: Exception) -> JSONResponse:
    # The client left before its body arrived: nobody reads this answer (uvicorn drops what is sent after
    # a disconnect); `RequestRecords` counts the request as status "disconnect" and logs its one line.
    return error_response(request, 400, "client_disconnected", "the client disconnected")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return error_response(request, 500, "internal", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    # Every handler is `async def`: Starlette runs a plain `def` handler in its thread pool, a thread hop
    # per error answer (measured: a 400 cost 2x the CPU through the pool) on the path a 429 storm takes.
    app.add_exception_handler(ServerError, _server_error)
    app.add_exception_handler(AdapterStoreError, _store_error)
    app.add_exception_handler(ImageRejected, _image_error)
    app.add_exception_handler(EngineError, _engine_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _unexpected)
