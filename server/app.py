"""The FastAPI application factory: `create_app(settings)`; a front end process runs it under uvicorn.

With `settings.engine_endpoints` (set by the supervisor) the app is a front end: it reaches the engine
processes over ZeroMQ, decodes into its shared-memory slab and never imports torch. Without it the app
runs an engine in its own process (`server.local_engine`: tests, single-process embedding), through the
same routes and the same `EngineClient` methods. The lifespan loads the backbone or connects to the
engines; /readyz is true only while every engine is warm and connected.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from PIL import Image

from adapters_store.store import AdapterStore
from server.connection_limits import ConnectionGuard, ConnectionLimits
from server.engine_client import EngineClient, RemoteEngines
from server.frontend import FrontEnd
from server.http_errors import install_error_handlers
from server.http_metrics import HttpMetrics
from server.logs import install_record_factory
from server.middleware import BodyLimits, RequestRecords
from server.routes import classify, domains, health, open_inference, page
from server.settings import Settings
from server.shm import PixelSlab


def _local_engine(settings: Settings, store: AdapterStore | None) -> EngineClient:
    # Imported here, not at the top: a front end (engine_endpoints set) must never load torch.
    local_engine = importlib.import_module("server.local_engine")
    service = importlib.import_module("server.engine_service").EngineService(settings, store)
    client: EngineClient = local_engine.LocalEngine(service)
    return client


async def _connect(settings: Settings) -> EngineClient:
    assert settings.engine_endpoints is not None
    if "torch" in sys.modules:  # the whole point of a front-end process; a test checks it too
        raise RuntimeError("a front end must not import torch")
    slab = PixelSlab.create(settings.slab_bytes)
    engines = RemoteEngines(
        settings.engine_endpoints.split(","), slab, timeout_s=settings.engine_timeout_s,
        name=f"frontend-{os.getpid()}",
    )  # fmt: skip
    await engines.start()
    return engines


def create_app(settings: Settings | None = None, *, store: AdapterStore | None = None) -> FastAPI:
    """A new app with its own metrics registry. `store` overrides the settings' store location and quotas
    (tests)."""
    settings = settings or Settings()
    metrics = HttpMetrics()
    # This front end's connection limits and body buffer, shared by its HTTP protocol (server.serving)
    # and the body middleware; answers the protocol gives itself are counted under route "connection".
    guard = ConnectionGuard(ConnectionLimits.for_frontend(settings))
    guard.observe = lambda status, seconds: metrics.observe_request("connection", "", status, seconds)
    install_record_factory()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # PIL's limit is process-wide; the decoder also checks the setting itself, exactly, from the header.
        Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
        if settings.engine_endpoints:
            engines = await _connect(settings)
        else:
            engines = await asyncio.to_thread(_local_engine, settings, store)
        pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        frontend = FrontEnd(settings, engines, pool, metrics)
        app.state.frontend = frontend
        try:
            yield
        finally:
            app.state.frontend = None
            await engines.close()
            await asyncio.to_thread(frontend.close)

    app = FastAPI(
        title="multidomain",
        summary="One frozen backbone, many visual domains chosen per request (residual adapters).",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.connection_guard = guard
    app.state.frontend = None
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(classify.router)
    app.include_router(domains.router)
    app.include_router(open_inference.router)
    app.include_router(page.router)

    def body_limit(path: str) -> tuple[int, bool]:
        # (limit, counted in the body buffer): an upload's body is read only once its admin token passed,
        # so only the operator can spend that memory; every other body is bounded by the buffer.
        if path.endswith("/adapters"):
            return settings.max_upload_bytes, False
        return settings.max_body_bytes, True

    # Added last = outermost: the body limits guard everything, metrics see every answer, and every
    # answer (a refusal by the body limits too) carries its request ID.
    app.add_middleware(BodyLimits, limit_for=body_limit, guard=guard)
    app.add_middleware(RequestRecords, metrics=metrics)
    return app
