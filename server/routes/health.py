"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.errors import NotReady
from server.schemas import Health, Ready, error_responses

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is alive (says nothing about the model)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Ready, responses=error_responses(503))
async def readyz(request: Request) -> Ready:
    """The backbone is loaded and warm: traffic can be sent."""
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None or not runtime.engine.warm:
        raise NotReady("the backbone is not loaded and warm yet")
    engine = runtime.engine
    return Ready(
        status="ready",
        backbone=engine.backbone_name,
        fingerprint=engine.fingerprint,
        device=str(engine.device),
        resident_domains=len(engine.resident()),
    )


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    runtime = getattr(request.app.state, "runtime", None)
    registry_owner = request.app.state.metrics
    engine = runtime.engine if runtime is not None else None
    depth = runtime.batcher.depth if runtime is not None else 0
    return Response(registry_owner.render(engine, depth), media_type=CONTENT_TYPE_LATEST)
