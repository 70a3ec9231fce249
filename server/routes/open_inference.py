"""The Open Inference Protocol (KServe v2) over REST, beside /v1: health, server and model metadata,
model readiness and infer, each domain a model and each stored domain version a model version.

    GET  /v2/health/live, /v2/health/ready, /v2
    GET  /v2/models/{domain}[/versions/{v}], /v2/models/{domain}[/versions/{v}]/ready
    POST /v2/models/{domain}[/versions/{v}]/infer

Without `versions/{v}` a request uses the active version. Errors are the protocol's `{"error": "..."}`
(`server.http_errors`) with /v1's statuses and limits: the same admission (429 with Retry-After), body
and pixel limits, decoding and engine. The tensors' encoding is `server.open_inference`. gRPC is not
served.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from PIL import Image

from domain_format.preprocess import ImageSpec, centre_crop, check_pixels, fit
from server.deps import FrontEndDep, VersionNumber, require_inference
from server.engine_client import PixelLease
from server.errors import NotReady
from server.lifetime import request_lifetime
from server.open_inference import (
    HEADER_LENGTH,
    IMAGE_INPUT,
    LABELS_OUTPUT,
    PIXELS_INPUT,
    PROBABILITIES_OUTPUT,
    encode_infer_response,
    parse_infer_request,
)
from server.routes.classify import (
    DecodePlan,
    ImageTask,
    admit,
    check_request_pixels,
    plan_decoding,
    request_slot,
    run_images,
)
from server.schemas import error_responses
from server.settings import Settings

router = APIRouter(
    prefix="/v2",
    tags=["open inference (KServe v2)"],
    responses=error_responses(404, 422, 503, protocol=True),
)
_INFER_ERRORS = error_responses(400, 401, 403, 413, 415, 429, 504, protocol=True)

EXTENSIONS = ["binary_tensor_data", "classification"]


@router.get("/health/live")
async def live() -> dict[str, bool]:
    """The process is alive."""
    return {"live": True}


@router.get("/health/ready")
async def ready(request: Request) -> dict[str, bool]:
    """Every engine is connected and warm (503 otherwise)."""
    frontend = getattr(request.app.state, "frontend", None)
    if frontend is None or frontend.engines.info() is None:
        raise NotReady("the backbone is not loaded and warm yet (or an engine is restarting)")
    return {"ready": True}


@router.get("")
async def server_metadata(request: Request) -> dict[str, Any]:
    """The server's name, version and protocol extensions."""
    return {"name": "multidomain", "version": request.app.version, "extensions": EXTENSIONS}


async def _metadata(frontend: FrontEndDep, domain: str, version: int | None) -> dict[str, Any]:
    detail = await frontend.engines.describe(domain, version)
    manifest = detail["manifest"]
    if manifest is None:  # a domain whose versions were all deleted, or one deleted meanwhile
        raise NotReady(f"domain {domain!r} has no version to describe")
    classes = len(manifest["labels"])
    pre = manifest["preprocessing"]
    return {
        "name": domain,
        "versions": [str(v) for v in detail["versions"]],
        "platform": f"multidomain_{manifest['backbone']}",
        "inputs": [  # the encoded images first: what Triton's image clients look for
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": PIXELS_INPUT, "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
        ],
        "outputs": [
            {"name": PROBABILITIES_OUTPUT, "datatype": "FP32", "shape": [-1, classes]},
            {"name": LABELS_OUTPUT, "datatype": "BYTES", "shape": [-1, -1]},
        ],
        "parameters": {
            "version": manifest["version"],
            "active_version": detail["active"],
            "labels": manifest["labels"],
            "input_size": pre["input_size"],
            "channels": pre["channels"],
        },
    }


@router.get("/models/{domain}")
async def model_metadata(frontend: FrontEndDep, domain: str) -> dict[str, Any]:
    """The domain's model metadata (its active version's labels and inputs)."""
    return await _metadata(frontend, domain, None)


@router.get("/models/{domain}/versions/{version}")
async def model_version_metadata(
    frontend: FrontEndDep, domain: str, version: VersionNumber
) -> dict[str, Any]:
    """One version's model metadata."""
    return await _metadata(frontend, domain, version)


async def _ready(frontend: FrontEndDep, domain: str, version: int | None) -> dict[str, Any]:
    # fresh, not this front end's cache: 404 as soon as the domain or version is gone
    resolved = await frontend.engines.resolve(domain, version, fresh=True)
    return {"name": domain, "version": str(resolved["version"]), "ready": True}


@router.get("/models/{domain}/ready")
async def model_ready(frontend: FrontEndDep, domain: str) -> dict[str, Any]:
    """200 when the domain's active version can be served (404: unknown, 503: engine not ready)."""
    return await _ready(frontend, domain, None)


@router.get("/models/{domain}/versions/{version}/ready")
async def model_version_ready(frontend: FrontEndDep, domain: str, version: VersionNumber) -> dict[str, Any]:
    """200 when that version can be served."""
    return await _ready(frontend, domain, version)


def _array_plan(pixels: np.ndarray, settings: Settings, spec: ImageSpec) -> DecodePlan:
    """UINT8 [N, H, W, 3] pixels through the steps decoded images take after decoding (`fit`, then the
    centre crop), one task per image, within the request's pixel budget and with the decoder's limit on
    the pixels once resized."""
    count, height, width = pixels.shape[:3]
    check_request_pixels(count * height * width, settings.max_request_pixels, count)
    check_pixels(width, height, spec, max_pixels=settings.max_image_pixels)

    def tasks(lease: PixelLease) -> list[ImageTask]:
        def task(row: int) -> Callable[[], None]:
            def run() -> None:
                # [S, S, 1] for grayscale domains broadcasts into the lease's 3 channels, as decoded images do
                image = Image.fromarray(pixels[row], "RGB")
                lease.array[row] = centre_crop(fit(image, spec), spec.input_size)

            return run

        return [(task(row), height * width) for row in range(count)]

    # no header or bitstream to parse: the cost is the pixels'
    inline = count * height * width <= settings.inline_decode_pixels
    return DecodePlan(count * height * width, tasks, inline)


async def _infer(request: Request, frontend: FrontEndDep, domain: str, version: int | None) -> Response:
    start = time.perf_counter()
    settings = frontend.settings
    request_body = await request.body()  # whole, before the slot (see server.routes.classify)
    with request_slot(frontend):
        async with request_lifetime(request, settings.request_timeout_s) as lifetime:
            parsed = parse_infer_request(
                request_body,
                request.headers.get(HEADER_LENGTH),
                max_images=settings.max_images_per_request,
                max_pixels=settings.max_image_pixels,
                max_top_k=settings.max_top_k,
            )
            lifetime.watch_disconnect()
            resolved = await admit(request, frontend, domain, version, parsed.images)
            encoded, arrays = parsed.encoded, parsed.pixels

            async def plan(spec: ImageSpec) -> DecodePlan:
                if encoded is not None:
                    return await plan_decoding(frontend, encoded, spec)
                assert arrays is not None
                return _array_plan(arrays, settings, spec)

            results, prepared, resolved = await run_images(
                frontend, lifetime, domain, resolved, parsed.images, plan, parsed.ranks_needed
            )
            classes = int(resolved["classes"])
    done = time.perf_counter()
    timing = {
        "total_ms": (done - start) * 1e3,
        "prepare_ms": (prepared - start) * 1e3,
        "inference_ms": (done - prepared) * 1e3,
    }
    body, header_length = encode_infer_response(
        parsed, domain, resolved["version"], classes, results, {"timing": timing}
    )
    if header_length is None:
        return Response(body, media_type="application/json")
    return Response(
        body,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(header_length)},
    )


class _InferResponse(Response):
    """The infer answer: JSON, or JSON followed by binary tensor data (application/octet-stream)."""

    media_type = "application/json"


_INFER_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The protocol's infer request: JSON, or JSON followed by binary tensor data whose "
        "JSON length is in the Inference-Header-Content-Length header.",
        "content": {"application/json": {"schema": {"type": "object"}}, "application/octet-stream": {}},
    },
    "responses": {
        "200": {
            "description": "The outputs; binary tensor data after the JSON when requested",
            "content": {"application/json": {"schema": {"type": "object"}}, "application/octet-stream": {}},
        }
    },
}


@router.post(
    "/models/{domain}/infer",
    dependencies=[Depends(require_inference)],
    openapi_extra=_INFER_DOC,
    responses=_INFER_ERRORS,
    response_class=_InferResponse,
)
async def infer(request: Request, frontend: FrontEndDep, domain: str) -> Response:
    """Classify with the domain's active version."""
    return await _infer(request, frontend, domain, None)


@router.post(
    "/models/{domain}/versions/{version}/infer",
    dependencies=[Depends(require_inference)],
    openapi_extra=_INFER_DOC,
    responses=_INFER_ERRORS,
    response_class=_InferResponse,
)
async def infer_version(
    request: Request, frontend: FrontEndDep, domain: str, version: VersionNumber
) -> Response:
    """Classify with one version of the domain (loaded on demand; 404 once deleted)."""
    return await _infer(request, frontend, domain, version)
