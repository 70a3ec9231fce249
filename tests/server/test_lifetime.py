"""A request's lifetime leaves nothing for the garbage collector: what it holds (the request, its watcher
task, the tasks' frames) is freed by reference counting when the request ends."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.requests import Request

from server.lifetime import request_lifetime


@pytest.fixture
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _request() -> Request:
    async def receive() -> dict[str, Any]:  # the body was read: only a disconnect could come, and none does
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    scope = {"type": "http", "method": "POST", "path": "/v1/classify", "headers": [], "query_string": b""}
    return Request(scope, receive)


def test_a_finished_request_frees_its_lifetime_without_the_collector(collector_off: None) -> None:
    async def serve() -> weakref.ref[Any]:
        async with request_lifetime(_request(), 5.0) as lifetime:
            lifetime.watch_disconnect()
            await asyncio.sleep(0)  # the watcher starts and waits in `receive`
            watcher = lifetime._watcher
            assert watcher is not None and not watcher.done()
            ref = weakref.ref(lifetime)
        del lifetime, watcher
        for _ in range(3):  # the watcher takes its cancellation and ends
            await asyncio.sleep(0)
        return ref

    ref = asyncio.run(serve())
    # Before the fix the cancelled watcher's task kept its CancelledError, whose traceback's frames held
    # the lifetime, which held the task: alive until a collection found the cycle.
    assert ref() is None
