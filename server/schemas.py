"""Pydantic models of the API's answers and JSON bodies (what /docs shows)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


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

    version: int | None = Field(default=None, ge=1)
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
