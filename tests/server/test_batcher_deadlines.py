"""The batcher drops queued images whose request gave up: its deadline passed, or its caller cancelled it."""

from __future__ import annotations

import time

import pytest

from adapters_store import LocalStore
from domain_format.preprocess import prepare
from server.batcher import Batcher, BatchEvents
from server.engine import Engine, EngineConfig
from server.errors import DeadlineExceeded
from tests.server.conftest import DOMAINS, encode, image


def test_images_past_their_deadline_or_cancelled_are_dropped_not_run(store: LocalStore) -> None:
    engine = Engine(store, EngineConfig(bank_slots=2))
    sizes: list[int] = []

    class Sizes(BatchEvents):
        def batch_run(self, size: int, domains: int, seconds: float) -> None:
            sizes.append(size)

    batcher = Batcher(engine, max_domains_per_batch=2, max_batch_size=8, max_wait_ms=50, events=Sizes())
    key = engine.resolve("birds")
    pixels = [prepare(encode(image(i)), DOMAINS["birds"][2].image_spec(), max_pixels=10**7) for i in range(6)]
    now = time.monotonic()
    expired = batcher.submit(key, pixels[:2], deadline=now - 1.0)  # gave up while queued
    later = batcher.submit(key, pixels[2:4], deadline=now + 3600.0)
    no_deadline = batcher.submit(key, pixels[4:5])
    cancelled = batcher.submit(key, pixels[5:6])
    assert cancelled[0].cancel()  # its in-process caller went away
    batcher.start()  # everything is queued before the worker looks
    try:
        answered = [f.result(timeout=60) for f in later + no_deadline]
        for future in expired:
            with pytest.raises(DeadlineExceeded):
                future.result(timeout=60)
    finally:
        batcher.stop()
    assert all(p.key == key for p in answered)
    assert cancelled[0].cancelled()
    assert sum(sizes) == 3  # only the three still wanted were run
