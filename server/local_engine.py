"""The in-process transport: an `EngineService` in this process behind the `EngineClient` methods.

What `create_app` uses without a supervisor (tests, benchmarks that skip processes): the same routes,
decoding and engine as the multi-process server, with a direct call where the channel would be. Store
and validation work runs in a thread, as the engine process runs it off its event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from server.engine_client import EncodedJpegs, EngineClient, PixelLease
from server.engine_service import EngineService, prediction_values
from server.errors import BadRequest
from server.protocol import Message

log = logging.getLogger("server.local_engine")


class LocalEngine(EngineClient):
    def __init__(self, service: EngineService) -> None:
        super().__init__()
        self.service = service
        self.count = 1
        self._ops: dict[str, Callable[..., Any]] = {
            "resolve": service.resolve,
            "upload": lambda **f: {"version": service.upload(**f)},
            "activate": lambda **f: {"version": service.activate(**f)},
            "delete": service.delete,
            "store_changed": service.store_changed,
            "listing": lambda: {"domains": service.listing()},
            "describe": lambda domain, version=None: {"domain": service.describe(domain, version)},
            "metrics": lambda: {"text": service.metrics_text(), "domains": service.store.list_domains()},
        }

    def ready(self) -> bool:
        return self.service.engine.warm

    def info(self) -> dict[str, Any] | None:
        return self.service.info() if self.ready() else None

    async def call(self, engine: int, op: str, **fields: Any) -> Message:
        if op not in self._ops:
            raise BadRequest(f"unknown engine operation {op!r}")
        result = await asyncio.to_thread(self._ops[op], **fields)
        return {"ok": True, **(result or {})}

    def lease(self, count: int, side: int) -> PixelLease:
        return PixelLease(np.empty((count, side, side, 3), dtype=np.uint8))

    async def _classify(
        self, engine: int, domain: str, version: int, images: PixelLease | EncodedJpegs, top_k: int, *,
        sha256: str | None, pinned: bool, deadline_s: float | None = None,
    ) -> Message:  # fmt: skip
        service = self.service
        if service.serving_key(domain, version, sha256, pinned, may_block=False) is None:
            await asyncio.to_thread(service.serving_key, domain, version, sha256, pinned)
        pixels: np.ndarray | torch.Tensor
        if isinstance(images, EncodedJpegs):
            pixels = await asyncio.wrap_future(service.decode_jpegs(domain, version, images.jpegs))
        else:
            pixels = images.array
        futures = service.submit(domain, version, pixels, top_k, deadline_s)
        predictions = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        log.debug("classified %d images in %s version %d", len(pixels), domain, version)
        return {"results": [prediction_values(p) for p in predictions], "version": version,
                **service.queue_state()}  # fmt: skip

    async def refresh(self) -> None:
        """Nothing to do: `info` is read from the service each time."""

    async def start(self) -> None:
        """Nothing to connect: the service runs in this process."""

    async def close(self) -> None:
        await asyncio.to_thread(self.service.close)
