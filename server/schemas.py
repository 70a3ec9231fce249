"""Pydantic models of the API's answers and JSON bodies (what /docs shows)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MAX_VERSION = 2**63 - 1
"""Largest version number a request may name: numbers cross the engine channel as msgpack's 64-bit
integers, so a larger one is refused with 422 instead of failing there (a 500 the schema fuzz found)."""


class LabelScoreOut(BaseModel):
    label: str
    index: int
    probability: float


class ImageResult(BaseModel):
    top_k: list[LabelScoreOut]


class Timing(BaseModel):
    total_ms: float
    """Server time from the request's arrival to the answer."""
    prepare_ms: float
    """Domain lookup, image decoding and preprocessing (thread pool)."""
    inference_ms: float
    """Queue wait plus the batch's forward pass."""


class ClassifyResponse(BaseModel):
    domain: str
    version: int
    """The adapter version every image of this answer was classified with."""
    results: list[ImageResult]
    timing: Timing


class ClassifyJSON(BaseModel):
    """JSON form of a classify request: base64-encoded images."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(min_length=1)
    top_k: int | None = Field(default=None, ge=1)


class DomainSummary(BaseModel):
    domain: str
    versions: list[int]
    active: int | None
    resident: bool


class DomainList(BaseModel):
    domains: list[DomainSummary]


class DomainDetail(BaseModel):
    domain: str
    versions: list[int]
    active: int | None
    previous: list[int]
    resident: bool
    resident_versions: list[int]
    manifest: dict[str, Any] | None
    """The active version's manifest (the latest version's if none is active)."""


class UploadResponse(BaseModel):
    domain: str
    version: int
    active: bool


class ActivateRequest(BaseModel):
    """Either a version to activate, or `rollback` to return to the previously active one."""

    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(default=None, ge=1, le=MAX_VERSION)
    rollback: bool = False


class ActiveResponse(BaseModel):
    domain: str
    active: int


class DeleteResponse(BaseModel):
    domain: str
    deleted: list[int] | str


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    backbone: str
    fingerprint: str
    device: str
    resident_domains: int


class ErrorDetail(BaseModel):
    """Every error answer's body is `{"error": ErrorDetail}`; some codes add fields (`problems`, `limit`...)."""

    model_config = ConfigDict(extra="allow")

    code: str
    """Stable, machine-readable: missing_domain, domain_not_found, invalid_artifact, queue_full..."""
    message: str
    """What is wrong, in words."""


class ErrorResponse(BaseModel):
    error: ErrorDetail


_ERROR_DESCRIPTIONS = {
    400: "Bad request (missing X-Domain header, malformed body or parameters)",
    401: "Missing bearer token",
    403: "Wrong bearer token, or admin endpoints disabled",
    404: "Unknown domain or version",
    409: "Conflicts with the store's state (e.g. deleting the active version)",
    413: "Body over the size limit, image or request over the pixel limit, or image too costly to decode",
    415: "Not a JPEG, PNG or WebP image / unsupported content type",
    422: "Corrupt image, JPEG with too many scans, invalid artifact (with every problem found) or invalid "
    "parameters",
    429: "Inference queue or decode budget full: retry after the Retry-After header's seconds",
    503: "Not ready, or the store is busy",
    504: "The request's deadline (MD_REQUEST_TIMEOUT_S or X-Request-Timeout) passed before its answer",
}


class OpenInferenceError(BaseModel):
    """The Open Inference Protocol's error body (under /v2)."""

    error: str


def error_responses(*statuses: int, protocol: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` documenting the JSON error body for these statuses (`protocol`: /v2's form)."""
    model = OpenInferenceError if protocol else ErrorResponse
    return {s: {"model": model, "description": _ERROR_DESCRIPTIONS[s]} for s in statuses}
