"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.errors import NotReady
from server.frontend import FrontEnd
from server.schemas import Health, Ready, error_responses

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is alive (says nothing about the model)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Ready, responses=error_responses(503))
async def readyz(request: Request) -> Ready:
    """Every engine is connected, its backbone loaded and warm: traffic can be sent."""
    frontend: FrontEnd | None = getattr(request.app.state, "frontend", None)
    if frontend is not None and frontend.engines.ready():
        await frontend.engines.refresh()
    info = frontend.engines.info() if frontend is not None else None
    if info is None:
        raise NotReady("the backbone is not loaded and warm yet (or an engine is restarting)")
    return Ready(
        status="ready",
        backbone=info["backbone"],
        fingerprint=info["fingerprint"],
        device=info["device"],
        resident_domains=info["resident_domains"],
    )


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition: this server's front ends (summed) and each engine (label `engine`)."""
    frontend: FrontEnd | None = getattr(request.app.state, "frontend", None)
    texts, domains = await frontend.engines.metrics_texts() if frontend is not None else ([], None)
    return Response(request.app.state.metrics.render(texts, domains), media_type=CONTENT_TYPE_LATEST)
