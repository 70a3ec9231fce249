"""Classification: `POST /v1/classify` (domain in `X-Domain`) and `POST /v1/domains/{domain}/classify`.

The body is one raw image (image/jpeg, image/png, image/webp), multipart with one or more image files, or
JSON with base64 images. Domain lookup, decoding and preprocessing run in the thread pool; inference
goes through the batcher. Every image of one request uses the same domain version, named in the answer.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from torch import Tensor

from domain_format.preprocess import ACCEPTED_MEDIA_TYPES
from server.deps import RuntimeDep, require_inference
from server.engine import DomainKey
from server.errors import BadRequest, MissingDomain, QueueFull, UnsupportedMediaType
from server.preprocess import preprocess
from server.runtime import Runtime
from server.schemas import ClassifyJSON, ClassifyResponse, ImageResult, LabelScoreOut, Timing, error_responses

router = APIRouter(
    prefix="/v1",
    tags=["classify"],
    dependencies=[Depends(require_inference)],
    responses=error_responses(400, 401, 403, 404, 413, 415, 422, 429, 503),
)

_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            **{t: {"schema": {"type": "string", "format": "binary"}} for t in ACCEPTED_MEDIA_TYPES},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            },
            "application/json": {"schema": ClassifyJSON.model_json_schema()},
        },
    }
}


async def _read_images(request: Request, max_images: int) -> tuple[list[bytes], int | None]:
    """The request's image bytes (and a top_k given in a JSON body)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type in ACCEPTED_MEDIA_TYPES or media_type == "application/octet-stream":
        return [await request.body()], None
    if media_type == "multipart/form-data":
        form = await request.form(max_files=max_images, max_fields=max_images)
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise BadRequest("the multipart body holds no image file")
        return [await f.read() for f in files], None
    if media_type == "application/json":
        try:
            body = ClassifyJSON.model_validate_json(await request.body())
        except ValidationError as exc:
            problems = [{"field": ".".join(map(str, e["loc"])), "message": e["msg"]} for e in exc.errors()]
            raise BadRequest(
                'the JSON body must be {"images": [base64, ...], "top_k": n}', problems=problems
            ) from None
        if len(body.images) > max_images:
            raise BadRequest(f"{len(body.images)} images exceed the limit of {max_images} per request")
        try:
            return [base64.b64decode(s, validate=True) for s in body.images], body.top_k
        except (binascii.Error, ValueError):
            raise BadRequest("an image is not valid base64") from None
    raise UnsupportedMediaType(
        f"unsupported content type {media_type or '(none)'!r}",
        accepted=[*ACCEPTED_MEDIA_TYPES, "multipart/form-data", "application/json"],
    )


def _prepare(runtime: Runtime, domain: str, images: list[bytes]) -> tuple[DomainKey, list[Tensor]]:
    """Resolve the active version, decode and preprocess (runs in the thread pool)."""
    key = runtime.engine.resolve(domain)
    runtime.engine.prefetch(key)  # a cold domain is read here, in parallel with the worker's batches
    pre = runtime.engine.manifest(key).preprocessing
    max_pixels = runtime.settings.max_image_pixels
    return key, [preprocess(data, pre, max_pixels=max_pixels) for data in images]


async def _classify(
    request: Request, runtime: Runtime, domain: str | None, top_k: int | None
) -> ClassifyResponse:
    if not domain:
        raise MissingDomain("name the domain in the X-Domain header (or use /v1/domains/{domain}/classify)")
    limit = runtime.settings.max_requests_in_flight
    if runtime.requests_in_flight >= limit:
        raise QueueFull(f"{runtime.requests_in_flight} requests are already in flight (limit {limit})")
    runtime.requests_in_flight += 1
    try:
        return await _admitted(request, runtime, domain, top_k)
    finally:
        runtime.requests_in_flight -= 1


async def _admitted(request: Request, runtime: Runtime, domain: str, top_k: int | None) -> ClassifyResponse:
    start = time.perf_counter()
    settings = runtime.settings
    images, json_top_k = await _read_images(request, settings.max_images_per_request)
    if len(images) > settings.max_images_per_request:
        raise BadRequest(
            f"{len(images)} images exceed the limit of {settings.max_images_per_request} per request"
        )
    k = json_top_k or top_k or 5
    if k > settings.max_top_k:
        raise BadRequest(f"top_k {k} exceeds the limit of {settings.max_top_k}")
    # Admission before decoding: images being decoded count against the queue limit, so requests beyond
    # it are refused at once instead of waiting behind everyone's decoding (the decode pool is unbounded).
    batcher = runtime.batcher
    queued, preparing = batcher.depth, runtime.images_preparing
    if queued + preparing + len(images) > batcher.max_queue:
        raise QueueFull(
            f"the inference queue is full ({queued} queued, {preparing} being decoded, limit {batcher.max_queue})",
            retry_after=batcher.retry_after(),
        )
    runtime.images_preparing += len(images)
    try:
        loop = asyncio.get_running_loop()
        key, tensors = await loop.run_in_executor(runtime.pool, _prepare, runtime, domain, images)
    finally:
        runtime.images_preparing -= len(images)
    request.state.metrics_domain = key.domain  # only existing domains become metric labels
    prepared = time.perf_counter()
    predictions = await batcher.classify(key, tensors, k)  # queues before its first await: no gap
    done = time.perf_counter()
    runtime.metrics.images.labels(key.domain).inc(len(predictions))
    return ClassifyResponse(
        domain=key.domain,
        version=key.version,
        results=[
            ImageResult(
                top_k=[LabelScoreOut(label=s.label, index=s.index, probability=s.probability) for s in p.top]
            )
            for p in predictions
        ],
        timing=Timing(
            total_ms=(done - start) * 1e3,
            prepare_ms=(prepared - start) * 1e3,
            inference_ms=(done - prepared) * 1e3,
        ),
    )


TopK = Annotated[int | None, Query(ge=1, description="How many classes to return per image (default 5)")]


@router.post("/classify", response_model=ClassifyResponse, openapi_extra=_BODY_DOC)
async def classify(
    request: Request,
    runtime: RuntimeDep,
    top_k: TopK = None,
    x_domain: Annotated[str | None, Header(description="The domain to classify in")] = None,
) -> ClassifyResponse:
    """Classify images in the domain named by the X-Domain header."""
    return await _classify(request, runtime, x_domain, top_k)


@router.post("/domains/{domain}/classify", response_model=ClassifyResponse, openapi_extra=_BODY_DOC)
async def classify_in(
    request: Request, runtime: RuntimeDep, domain: str, top_k: TopK = None
) -> ClassifyResponse:
    """Classify images in the domain named in the path."""
    return await _classify(request, runtime, domain, top_k)
