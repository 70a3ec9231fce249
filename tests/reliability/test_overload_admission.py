"""Admission under overload: requests beyond the queue limit must be refused at once, not after waiting
behind every other request's decoding.

The decode pool is held busy by jobs that wait on an event (the real pool, the real app); requests sent
meanwhile cannot be decoded. With admission counted before decoding, those beyond `max_queue` images get
429 (with Retry-After) while the pool is still held. When the limit was checked only as decoded tensors
reached the batcher, every request waited in the decode pool's unbounded queue: bench/overload.py saw
429s after 46 s at 9x capacity, before the server counted images being decoded at admission.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.frontend import FrontEnd
from server.serving import ServerThread
from tests.server.conftest import TinyWorld, encode, image, make_store, settings_for

MAX_QUEUE = 2
REQUESTS = 6
REFUSAL_WAIT_S = 3.0
"""How long refusals may take while the pool is held (they should take milliseconds; only the failing
path ever waits this long)."""


@pytest.fixture
def held_server(world: TinyWorld, tmp_path: Path) -> Iterator[tuple[ServerThread, threading.Event]]:
    store = make_store(world, tmp_path / "store")
    app = create_app(settings_for(store, max_queue=MAX_QUEUE, decode_threads=1, inline_decode_pixels=0))
    release = threading.Event()
    with ServerThread(app) as server:
        assert httpx.get(f"{server.url}/readyz", timeout=60).status_code == 200  # waits for start-up
        frontend: FrontEnd = app.state.frontend
        holder = frontend.pool.submit(release.wait)  # the only decode thread is now busy
        try:
            yield server, release
        finally:
            release.set()
            holder.result(timeout=60)


def test_requests_beyond_the_queue_are_refused_without_waiting(
    held_server: tuple[ServerThread, threading.Event],
) -> None:
    server, release = held_server
    body = encode(image(seed=5))

    def post() -> httpx.Response:
        return httpx.post(
            f"{server.url}/v1/domains/birds/classify",
            content=body,
            headers={"Content-Type": "image/png"},
            timeout=60,
        )

    with ThreadPoolExecutor(REQUESTS) as clients:
        futures: list[Future[httpx.Response]] = [clients.submit(post) for _ in range(REQUESTS)]
        refused: list[httpx.Response] = []
        pending = set(futures)
        while len(refused) < REQUESTS - MAX_QUEUE:
            done, pending = wait(pending, timeout=REFUSAL_WAIT_S, return_when=FIRST_COMPLETED)
            if not done:
                break
            refused += [f.result() for f in done]
        release.set()
        answers = [f.result() for f in futures]
    assert len(refused) == REQUESTS - MAX_QUEUE, f"{len(refused)} answered while the decode pool was held"
    assert all(r.status_code == 429 and "retry-after" in r.headers for r in refused)
    assert sorted(r.status_code for r in answers) == [200] * MAX_QUEUE + [429] * (REQUESTS - MAX_QUEUE)
