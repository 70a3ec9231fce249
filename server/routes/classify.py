"""Classification: `POST /v1/classify` (domain in `X-Domain`), `POST /v1/domains/{domain}/classify` and
`POST /v1/domains/{domain}/versions/{version}/classify` (a pinned version, loaded on demand).

The body is one raw image (image/jpeg, image/png, image/webp), multipart with one or more image files, or
JSON with base64 images. The engine resolves the domain's active version (cached by the front end, checked
by the engine when the images are classified); the images' headers are read and checked (format, pixels,
JPEG scans, decode cost, the request's pixel budget) before any is decoded; admission counts the
request's images against the queue and its pixels against the decode budget; decoding and cropping to
uint8 run in this front end's thread pool (`server.decoding`), into shared memory; inference goes to the
engine serving the domain. Every image of one request uses the same domain version, named in the answer.
A request has a deadline (`server.lifetime`): past it 504, and work not started for it (decoding, or
inference still queued) is dropped, as it is when its client has gone.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, NamedTuple

from fastapi import APIRouter, Depends, Header, Query, Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from adapters_store.manifest import Preprocessing
from domain_format.preprocess import (
    ACCEPTED_MEDIA_TYPES,
    ImageHeader,
    ImageSpec,
    TooManyPixels,
    decode_header,
    read_header,
)
from server.decoding import DecodeStopped
from server.deps import FrontEndDep, VersionNumber, require_inference
from server.device_jpeg import engine_decodable
from server.engine_client import EncodedJpegs, PixelLease
from server.errors import BadRequest, MissingDomain, QueueFull, StaleVersion, UnsupportedMediaType
from server.frontend import FrontEnd
from server.lifetime import RequestLifetime, request_lifetime
from server.schemas import ClassifyJSON, ClassifyResponse, ImageResult, LabelScoreOut, Timing, error_responses

router = APIRouter(
    prefix="/v1",
    tags=["classify"],
    dependencies=[Depends(require_inference)],
    responses=error_responses(400, 401, 403, 404, 413, 415, 422, 429, 503, 504),
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


ImageTask = tuple[Callable[[], None], int]
"""Decode one image into its row of the lease (run in the decode pool), and the image's pixels."""


def read_headers(frontend: FrontEnd, images: list[bytes], spec: ImageSpec) -> list[ImageHeader]:
    """Every image's header checked (in the header pool), and the request's pixels within its budget,
    before any pixel is decoded."""
    settings = frontend.settings
    headers, pixels = [], 0
    for data in images:
        header = read_header(
            data,
            spec,
            max_pixels=settings.max_image_pixels,
            max_jpeg_scans=settings.max_jpeg_scans,
            max_decode_bytes=settings.max_image_decode_bytes,
        )
        headers.append(header)
        pixels += header.pixels
        check_request_pixels(pixels, settings.max_request_pixels, len(images))
    return headers


def check_request_pixels(pixels: int, limit: int, images: int) -> None:
    if pixels > limit:
        raise TooManyPixels(
            f"the request's {images} images have {pixels} pixels or more, over the limit of {limit} per "
            f"request",
            max_pixels=limit,
        )


class DecodePlan(NamedTuple):
    pixels: int
    """Width x height summed over the request's images (from their headers)."""
    tasks: Callable[[PixelLease], list[ImageTask]]
    """The decode tasks into a lease."""
    inline: bool
    """Cheap enough to decode on the event loop (`DecodeScheduler.run`)."""
    jpegs: EncodedJpegs | None = None
    """The images as they came, for the engine to decode instead (`MD_ENGINE_JPEG_DECODE`)."""


INLINE_BODY_BYTES = 16 * 1024
"""Bodies of at most this many bytes in all have their headers read on the event loop, and their images
decoded there too when they have at most `inline_decode_pixels` pixels. A thread hand-off (a pool
thread woken, then the loop) costs more CPU than reading such a header (10-50 us) or decoding a 64 px
image (0.1-0.2 ms): header and decode of a 64 px PNG took 0.12 ms of CPU on the loop against 0.36-0.48
ms through the two pools (one process, 16 requests at once), and each wake-up on a host whose cores the
engine's threads use preempts one of them. Header parsing is linear in the bytes (a hostile 16 KiB of
tiny PNG chunks or empty JPEG segments takes 3-5 ms), so the bound caps what a request can hold the loop
for; in the header pool such bytes held the GIL, and so the loop, as long."""


async def plan_decoding(frontend: FrontEnd, images: list[bytes], spec: ImageSpec) -> DecodePlan:
    """The encoded images' headers read and checked with `spec` (in the header pool, off the event loop
    and apart from decoding, unless the request is small: `INLINE_BODY_BYTES`), and their decode tasks;
    or, with `MD_ENGINE_JPEG_DECODE` and only JPEGs the engine decodes alike, the images to hand on."""
    inline_pixels = frontend.settings.inline_decode_pixels
    small = inline_pixels > 0 and sum(map(len, images)) <= INLINE_BODY_BYTES
    if small:
        headers = read_headers(frontend, images, spec)
    else:
        loop = asyncio.get_running_loop()
        headers = await loop.run_in_executor(frontend.header_pool, read_headers, frontend, images, spec)
    pixels = sum(h.pixels for h in headers)
    if frontend.settings.engine_jpeg_decode and all(engine_decodable(h, spec) for h in headers):
        return DecodePlan(pixels, lambda lease: [], False, EncodedJpegs(images))
    return DecodePlan(
        pixels,
        lambda lease: decode_tasks(headers, spec, lease),
        small and pixels <= inline_pixels,
    )


def decode_tasks(headers: list[ImageHeader], spec: ImageSpec, lease: PixelLease) -> list[ImageTask]:
    """One task per image: decode and crop it to uint8 straight into its row of the pixel lease."""

    def task(row: int, header: ImageHeader) -> Callable[[], None]:
        def run() -> None:
            # [S, S, 1] for grayscale domains: broadcast into the lease's 3 channels (normalise would
            # replicate it to three anyway, with the same values)
            lease.array[row] = decode_header(header, spec)

        return run

    return [(task(row, header), header.pixels) for row, header in enumerate(headers)]


async def _classify(
    request: Request, frontend: FrontEnd, domain: str | None, top_k: int | None, version: int | None = None
) -> ClassifyResponse:
    if not domain:
        raise MissingDomain("name the domain in the X-Domain header (or use /v1/domains/{domain}/classify)")
    start = time.perf_counter()
    settings = frontend.settings
    images, json_top_k = await _read_images(request, settings.max_images_per_request)
    # The slot only now that the whole body is here: clients still sending (slowly, or never finishing)
    # hold a connection and their body's share of the buffer, not the capacity of those who have sent.
    with request_slot(frontend):
        async with request_lifetime(request, settings.request_timeout_s) as lifetime:
            return await _admitted(
                request, frontend, lifetime, domain, images, json_top_k, top_k, version, start
            )


@contextmanager
def request_slot(frontend: FrontEnd) -> Iterator[None]:
    """One of this front end's classify requests in flight (429 beyond its share of the limit): taken
    once the request's whole body has arrived."""
    limit = frontend.max_requests_in_flight
    if frontend.requests_in_flight >= limit:
        raise QueueFull(f"{frontend.requests_in_flight} requests are already in flight here (limit {limit})")
    frontend.requests_in_flight += 1
    try:
        yield
    finally:
        frontend.requests_in_flight -= 1


async def _admitted(
    request: Request,
    frontend: FrontEnd,
    lifetime: RequestLifetime,
    domain: str,
    images: list[bytes],
    json_top_k: int | None,
    top_k: int | None,
    version: int | None,
    start: float,
) -> ClassifyResponse:
    settings = frontend.settings
    lifetime.watch_disconnect()
    if len(images) > settings.max_images_per_request:
        raise BadRequest(
            f"{len(images)} images exceed the limit of {settings.max_images_per_request} per request"
        )
    k = json_top_k or top_k or 5
    if k > settings.max_top_k:
        raise BadRequest(f"top_k {k} exceeds the limit of {settings.max_top_k}")
    resolved = await admit(request, frontend, domain, version, len(images))

    async def plan(spec: ImageSpec) -> DecodePlan:
        return await plan_decoding(frontend, images, spec)

    results, prepared, resolved = await run_images(frontend, lifetime, domain, resolved, len(images), plan, k)
    done = time.perf_counter()
    return ClassifyResponse(
        domain=domain,
        version=resolved["version"],
        results=[
            ImageResult(top_k=[LabelScoreOut(index=i, label=label, probability=p) for i, label, p in result])
            for result in results
        ],
        timing=Timing(
            total_ms=(done - start) * 1e3,
            prepare_ms=(prepared - start) * 1e3,
            inference_ms=(done - prepared) * 1e3,
        ),
    )


async def admit(
    request: Request, frontend: FrontEnd, domain: str, version: int | None, images: int
) -> dict[str, Any]:
    """Resolve the version every image of the request uses (the active one unless pinned) and refuse
    the request when the engine's queue has no room for its images (429)."""
    resolved = await frontend.engines.resolve(domain, version)
    request.state.metrics_domain = domain  # only existing domains become metric labels
    check_queue(frontend, resolved, images)
    return resolved


def check_queue(frontend: FrontEnd, resolved: dict[str, Any], images: int) -> None:
    """429 unless the engine's queue (as of its latest answer to this front end) has room for the images
    being decoded here and the request's. Checked at admission and again, on the event loop with no await
    between, where the request's images start to count (`run_images`, on every attempt): requests
    admitted meanwhile are then counted."""
    # Admission before decoding: images being decoded count against the queue limit, so requests beyond
    # it are refused at once instead of waiting behind everyone's decoding (the decode pool is unbounded).
    queued, preparing, max_queue = resolved["queued"], frontend.images_preparing, resolved["max_queue"]
    if queued + preparing + images > max_queue:
        raise QueueFull(
            f"the inference queue is full ({queued} queued, {preparing} being decoded, limit {max_queue})",
            retry_after=resolved["retry_after"],
        )


_ATTEMPTS = 3
"""Tries of a request whose resolved version went stale meanwhile (the last one is served unchecked)."""


async def run_images(
    frontend: FrontEnd,
    lifetime: RequestLifetime,
    domain: str,
    resolved: dict[str, Any],
    count: int,
    plan: Callable[[ImageSpec], Awaitable[DecodePlan]],
    top_k: int | Callable[[int], int],
) -> tuple[list[list[Any]], float, dict[str, Any]]:
    """Admit the request for decoding, fill a pixel lease with its `count` crops (the tasks of `plan`, one
    per image, in the decode scheduler) and classify them with the resolved version; per image [[index,
    label, probability], ...], when the pixels were ready and the resolve answer that served. `plan`:
    the request's pixels and decode tasks for a version's image spec (its headers read and checked);
    `top_k`: a count, or one from the version's class count.

    Admission is checked where the request's images and pixels start to count, on the event loop with no
    await between: the engine's queue has room for its images and this front end's decode budget for its
    pixels (429 beyond its share), which are charged until its decoding ends. A plan that hands the
    images on (`DecodePlan.jpegs`: the engine decodes them) charges no pixels here.

    `resolved` may come from this front end's cache: when the engine finds it stale (another version
    activated through another front end, or the domain re-created), the request is resolved afresh and
    its pixels planned and prepared again with that version's preprocessing, so every image uses one
    version; each attempt is admitted, and its pixels charged, anew (the last one's charge was given back
    when its decoding ended)."""
    for attempt in range(_ATTEMPTS):
        pre = Preprocessing.model_validate(resolved["preprocessing"])
        k = top_k if isinstance(top_k, int) else top_k(int(resolved["classes"]))
        pixels, tasks, inline, jpegs = await plan(pre.image_spec())
        check_queue(frontend, resolved, count)
        if jpegs is None and not frontend.pixels_fit(pixels):  # JPEGs handed on are not decoded here
            raise QueueFull(
                f"this front end is decoding {frontend.pixels_decoding} pixels; the request's {pixels} more "
                f"would pass its share of {frontend.max_pixels_decoding} (of which a quarter is kept for "
                f"requests of small images)",
            )
        images = jpegs if jpegs is not None else frontend.engines.lease(count, pre.input_size)
        try:
            if isinstance(images, PixelLease):
                await decode_into(frontend, lifetime, images, tasks, pixels, inline)
            if lifetime.should_stop():
                raise lifetime.stop_reason()
            prepared = time.perf_counter()
            try:
                results = await frontend.engines.classify(
                    resolved, images, k, check=attempt < _ATTEMPTS - 1, deadline_s=lifetime.remaining()
                )
            except StaleVersion:
                pinned = int(resolved["version"]) if resolved["pinned"] else None
                resolved = await frontend.engines.resolve(domain, pinned, fresh=True)
                continue
        finally:
            images.release()  # only after the engine's answer: it reads the pixels in place
        frontend.metrics.images.labels(domain).inc(len(results))
        return results, prepared, resolved
    raise AssertionError("unreachable: the last attempt is not checked")


async def decode_into(
    frontend: FrontEnd,
    lifetime: RequestLifetime,
    lease: PixelLease,
    tasks: Callable[[PixelLease], list[ImageTask]],
    pixels: int,
    inline: bool,
) -> None:
    """Decode a request's images into its lease, its images and pixels counted as being prepared meanwhile."""
    frontend.images_preparing += len(lease.array)
    frontend.pixels_decoding += pixels
    try:
        await frontend.decoder.run(tasks(lease), lifetime.should_stop, inline=inline)
    except DecodeStopped:
        raise lifetime.stop_reason() from None
    finally:
        frontend.images_preparing -= len(lease.array)
        frontend.pixels_decoding -= pixels


TopK = Annotated[int | None, Query(ge=1, description="How many classes to return per image (default 5)")]


@router.post("/classify", response_model=ClassifyResponse, openapi_extra=_BODY_DOC)
async def classify(
    request: Request,
    frontend: FrontEndDep,
    top_k: TopK = None,
    x_domain: Annotated[str | None, Header(description="The domain to classify in")] = None,
) -> ClassifyResponse:
    """Classify images in the domain named by the X-Domain header."""
    return await _classify(request, frontend, x_domain, top_k)


@router.post("/domains/{domain}/classify", response_model=ClassifyResponse, openapi_extra=_BODY_DOC)
async def classify_in(
    request: Request, frontend: FrontEndDep, domain: str, top_k: TopK = None
) -> ClassifyResponse:
    """Classify images in the domain named in the path."""
    return await _classify(request, frontend, domain, top_k)


@router.post(
    "/domains/{domain}/versions/{version}/classify", response_model=ClassifyResponse, openapi_extra=_BODY_DOC
)
async def classify_version(
    request: Request, frontend: FrontEndDep, domain: str, version: VersionNumber, top_k: TopK = None
) -> ClassifyResponse:
    """Classify images with one version of the domain (loaded on demand; 404 once deleted)."""
    return await _classify(request, frontend, domain, top_k, version)
