"""What one running app holds: settings, store, engine, batcher, decode pool and metrics.

Built by the app's lifespan (or directly, for tests and benchmarks that skip HTTP).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from PIL import Image

from adapters_store.open import open_store
from adapters_store.store import AdapterStore
from server.batcher import Batcher
from server.engine import Engine, EngineConfig
from server.metrics import Metrics
from server.settings import Settings


def engine_config(settings: Settings) -> EngineConfig:
    return EngineConfig(
        device=settings.device,
        dtype=settings.dtype,
        channels_last=settings.channels_last,
        bank_slots=settings.bank_slots,
        merged_cache=settings.merged_cache,
        revision_poll_s=settings.revision_poll_s,
    )


@dataclass
class Runtime:
    settings: Settings
    store: AdapterStore
    engine: Engine
    batcher: Batcher
    pool: ThreadPoolExecutor
    metrics: Metrics
    requests_in_flight: int = 0
    """Classify requests admitted and not yet answered (touched only on the event loop)."""
    images_preparing: int = 0
    """Images admitted and being decoded, not yet in the batcher's queue (touched only on the event loop):
    counted against the queue limit so overload is refused before decoding, not after."""

    @classmethod
    def start(cls, settings: Settings, metrics: Metrics, store: AdapterStore | None = None) -> Runtime:
        """Load the backbone, warm up and start the inference worker (blocking: call off the event loop)."""
        if settings.torch_threads is not None:
            torch.set_num_threads(settings.torch_threads)
        # PIL's limit is process-wide; the decoder also checks the setting itself, exactly, from the header.
        Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
        store = (
            store
            if store is not None
            else open_store(settings.store_location, quotas=settings.store_quotas())
        )
        engine = Engine(store, engine_config(settings), events=metrics)
        if settings.warmup:
            engine.warm_up()
        engine.warm = True
        batcher = Batcher(
            engine,
            max_domains_per_batch=settings.bank_slots,  # a batch never needs more slots than the bank has
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            events=metrics,
        )
        batcher.start()
        pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        return cls(settings, store, engine, batcher, pool, metrics)

    def close(self) -> None:
        self.batcher.stop()
        self.pool.shutdown(wait=True, cancel_futures=True)
