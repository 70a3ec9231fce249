"""The FastAPI application factory: `create_app(settings)`; uvicorn runs `server.app:create_app --factory`.

The lifespan loads the backbone (off the event loop), warms it up and starts the inference worker; the
server only starts answering once that is done, so /readyz is true from the first request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from adapters_store.store import AdapterStore
from server.http_errors import install_error_handlers
from server.metrics import Metrics
from server.middleware import BodySizeLimit, RequestMetrics
from server.routes import classify, domains, health
from server.runtime import Runtime
from server.settings import Settings


def create_app(settings: Settings | None = None, *, store: AdapterStore | None = None) -> FastAPI:
    """A new app with its own metrics registry. `store` overrides the settings' store location and quotas
    (tests)."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await asyncio.to_thread(Runtime.start, settings, metrics, store)
        app.state.runtime = runtime
        try:
            yield
        finally:
            app.state.runtime = None
            await asyncio.to_thread(runtime.close)

    app = FastAPI(
        title="multidomain",
        summary="One frozen backbone, many visual domains chosen per request (residual adapters).",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.runtime = None
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(classify.router)
    app.include_router(domains.router)

    def body_limit(path: str) -> int:
        return settings.max_upload_bytes if path.endswith("/adapters") else settings.max_body_bytes

    # Added last = outermost: the body limit guards everything, metrics see every answer.
    app.add_middleware(BodySizeLimit, limit_for=body_limit)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app
