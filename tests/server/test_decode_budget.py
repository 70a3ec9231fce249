"""Decoding has a budget: refused before decoding (scans, the request's pixels, one image's cost), admission
counted in pixels, and work dropped when its request's deadline passes or its client goes.

The app runs under real uvicorn on loopback (`ServerThread`). Where a request must wait, the decode pool's
only thread is held by a job that waits on an event, as `tests/reliability/test_overload_admission.py`
does; what a test waits for is an answer, or a log record (the request log's line for a request).
"""

from __future__ import annotations

import io
import logging
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from PIL import Image

from adapters_store import LocalStore
from model_artifacts import validate_domain
from server.app import create_app
from server.frontend import FrontEnd
from server.serving import ServerThread
from tests.server.conftest import TinyWorld, encode, image, make_store, settings_for

PNG = {"Content-Type": "image/png", "X-Domain": "birds"}
ANSWER_S = 60.0
"""How long a test waits for an answer before failing (answers take milliseconds here)."""


@contextmanager
def serving(world: TinyWorld, tmp_path: Path, **settings: object) -> Iterator[tuple[ServerThread, FrontEnd]]:
    """The app on loopback. These tests hold the pools, so their tiny images decode there, not on the
    event loop: `inline_decode_pixels` is 0 unless a test sets it."""
    settings.setdefault("inline_decode_pixels", 0)
    store = make_store(world, tmp_path / "store")
    app = create_app(settings_for(store, **settings))
    with ServerThread(app) as server:
        assert httpx.get(f"{server.url}/readyz", timeout=ANSWER_S).status_code == 200
        yield server, app.state.frontend


@contextmanager
def held_pool(frontend: FrontEnd) -> Iterator[threading.Event]:
    """The decode pool's only thread, and the large images' lane, busy until the event is set (set on exit
    too)."""
    release = threading.Event()
    pools = [frontend.pool] if frontend.large_pool is None else [frontend.pool, frontend.large_pool]
    holders = [pool.submit(release.wait) for pool in pools]
    try:
        yield release
    finally:
        release.set()
        for holder in holders:
            holder.result(timeout=ANSWER_S)


def post(server: ServerThread, body: bytes, path: str = "/v1/classify", **headers: str) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", content=body, headers={**PNG, **headers}, timeout=ANSWER_S)


def multipart(server: ServerThread, images: list[bytes]) -> httpx.Response:
    files = [("file", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return httpx.post(
        f"{server.url}/v1/classify", files=files, headers={"X-Domain": "birds"}, timeout=ANSWER_S
    )


def error(r: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert r.status_code == status, r.text
    body: dict[str, object] = r.json()["error"]
    assert body["code"] == code
    return body


def jpeg(img: Image.Image, **options: object) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90, **options)
    return out.getvalue()


def scan_bomb(times: int = 1000) -> bytes:
    """A progressive JPEG whose last scan is repeated `times` times (the issue's 38 KB, 2.2 s image)."""
    data = jpeg(image(3, (64, 48)), progressive=True)
    last, end = data.rindex(b"\xff\xda"), data.rindex(b"\xff\xd9")
    return data[:end] + data[last:end] * times + data[end:]


class RequestLog(logging.Handler):
    """The request log's lines (`server.requests`), with an event per status seen."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: dict[str, threading.Event] = {}
        self.guard = threading.Lock()

    def seen(self, status: str) -> threading.Event:
        with self.guard:
            return self.statuses.setdefault(status, threading.Event())

    def emit(self, record: logging.LogRecord) -> None:
        if len(record.args or ()) >= 3:
            self.seen(str(record.args[2])).set()  # type: ignore[index]


@pytest.fixture
def request_log() -> Iterator[RequestLog]:
    handler = RequestLog()
    logger = logging.getLogger("server.requests")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)  # a disconnect's line is a debug line
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


# -- refused before decoding ---------------------------------------------------------------------------
def test_a_scan_bomb_is_refused_with_422_naming_the_limit(world: TinyWorld, tmp_path: Path) -> None:
    with serving(world, tmp_path) as (server, frontend):
        ok = post(server, jpeg(image(3, (64, 48)), progressive=True), **{"Content-Type": "image/jpeg"})
        assert ok.status_code == 200, ok.text
        decoded = frontend.decoder.images_decoded
        body = error(post(server, scan_bomb(), **{"Content-Type": "image/jpeg"}), 422, "too_many_scans")
        assert "more than 32 scans" in str(body["message"]) and body["max_scans"] == 32
        # the same through the Open Inference Protocol (its own error form)
        infer = {
            "inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES", "data": [_b64(scan_bomb())]}]
        }
        r = httpx.post(f"{server.url}/v2/models/birds/infer", json=infer, timeout=ANSWER_S)
        assert r.status_code == 422 and "more than 32 scans" in r.json()["error"]
        assert frontend.decoder.images_decoded == decoded  # neither reached the decoder


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def test_the_request_pixel_budget_is_checked_on_the_headers_before_any_decode(
    world: TinyWorld, tmp_path: Path
) -> None:
    one = encode(image(1, (40, 32)))  # 1280 pixels
    with serving(world, tmp_path, max_request_pixels=3 * 1280) as (server, frontend):
        assert multipart(server, [one] * 3).status_code == 200
        decoded = frontend.decoder.images_decoded
        body = error(multipart(server, [one] * 4), 413, "too_many_pixels")
        assert "5120 pixels" in str(body["message"]) and body["max_pixels"] == 3 * 1280
        assert frontend.decoder.images_decoded == decoded  # not one of the four was decoded
        # PIXELS tensors of the Open Inference Protocol count too
        pixels = {"inputs": [{"name": "PIXELS", "shape": [4, 32, 40, 3], "datatype": "UINT8",
                              "data": [0] * (4 * 32 * 40 * 3)}]}  # fmt: skip
        r = httpx.post(f"{server.url}/v2/models/birds/infer", json=pixels, timeout=ANSWER_S)
        assert r.status_code == 413 and "5120 pixels" in r.json()["error"]


def test_an_image_too_costly_to_decode_is_refused(world: TinyWorld, tmp_path: Path) -> None:
    img = image(2, (64, 48))
    bound = 64 * 48 * 3 * 2  # two passes: a baseline JPEG (1) fits, a progressive one (4.7) does not
    with serving(world, tmp_path, max_image_decode_bytes=bound) as (server, _):
        assert post(server, jpeg(img), **{"Content-Type": "image/jpeg"}).status_code == 200
        body = error(
            post(server, jpeg(img, progressive=True), **{"Content-Type": "image/jpeg"}),
            413,
            "too_costly_to_decode",
        )
        assert body["max_decode_bytes"] == bound


# -- admission in pixels -------------------------------------------------------------------------------
def jobs_reach(frontend: FrontEnd, jobs: int) -> bool:
    """Wait until `jobs` requests are in the decode scheduler (admitted, their images waiting or decoding)."""
    decoder = frontend.decoder
    with decoder.changed:
        return decoder.changed.wait_for(lambda: decoder.jobs == jobs, timeout=ANSWER_S)


def test_admission_counts_pixels_and_keeps_room_for_small_requests(world: TinyWorld, tmp_path: Path) -> None:
    big = encode(image(4, (400, 300)))  # 120 000 pixels: 60 % of the share below, so large
    probe = encode(image(5, (20, 16)))  # 320 pixels: under 1/64 of the share, so small
    with serving(world, tmp_path, decode_threads=1, max_pixels_decoding=200_000) as (server, frontend):
        with held_pool(frontend) as release, ThreadPoolExecutor(2) as clients:
            first: Future[httpx.Response] = clients.submit(post, server, big)
            assert jobs_reach(frontend, 1), "the first large request was not admitted"
            assert frontend.pixels_decoding == 120_000
            # a second large request would pass 3/4 of the share: 429 at once, while the pool is held
            refused = post(server, big)
            error(refused, 429, "queue_full")
            assert "120000 pixels" in refused.text and "retry-after" in refused.headers
            # a small one still fits in the quarter kept free
            small: Future[httpx.Response] = clients.submit(post, server, probe)
            assert jobs_reach(frontend, 2), "the small request was not admitted"
            assert frontend.pixels_decoding == 120_320
            release.set()
            assert first.result(ANSWER_S).status_code == 200
            assert small.result(ANSWER_S).status_code == 200
        assert frontend.pixels_decoding == 0
        assert post(server, big).status_code == 200  # the budget was given back


def test_a_stale_resolve_is_decoded_again_with_its_pixels_charged_once(
    world: TinyWorld, tmp_path: Path
) -> None:
    """The front end's cached resolve goes stale when another writer activates a version: the request is
    planned, admitted and decoded again for the new version. The first attempt's pixels are given back
    when its decoding ends: charged twice, this large request would be refused (429) by its own retry."""
    big = encode(image(4, (400, 300)))  # 120 000 pixels: 60 % of the share below, so large
    with serving(world, tmp_path, decode_threads=1, max_pixels_decoding=200_000) as (server, frontend):
        first = post(server, big)
        assert first.status_code == 200 and first.json()["version"] == 1  # cached: v1
        other = LocalStore(tmp_path / "store")  # another writer on the served store (e.g. the store CLI)
        art = world.artifacts["birds_v2"]
        other.put(validate_domain(art.manifest, art.tensors, world.net), activate=True)
        decoded = frontend.decoder.images_decoded
        answer = post(server, big)
        assert answer.status_code == 200, answer.text
        assert answer.json()["version"] == 2
        assert frontend.decoder.images_decoded == decoded + 2  # for v1, found stale, then for v2
        assert frontend.pixels_decoding == 0 and frontend.images_preparing == 0


# -- deadlines and clients gone ------------------------------------------------------------------------
def test_a_request_past_its_deadline_gets_504_and_its_image_is_never_decoded(
    world: TinyWorld, tmp_path: Path
) -> None:
    with serving(world, tmp_path, decode_threads=1) as (server, frontend):
        with held_pool(frontend) as release, ThreadPoolExecutor(1) as clients:
            first: Future[httpx.Response] = clients.submit(post, server, encode(image(6)))
            assert jobs_reach(frontend, 1)
            # the first request's image waits in the held pool; this one's waits in the scheduler
            late = post(server, encode(image(7)), **{"X-Request-Timeout": "0.5"})
            error(late, 504, "deadline_exceeded")
            assert frontend.decoder.images_skipped == 1 and frontend.decoder.jobs == 1
            release.set()
            assert first.result(ANSWER_S).status_code == 200
        assert frontend.decoder.images_skipped == 1  # the late image was never decoded
        assert post(server, encode(image(7)), **{"X-Request-Timeout": "30"}).status_code == 200


def test_the_deadline_setting_applies_and_caps_the_header(world: TinyWorld, tmp_path: Path) -> None:
    with serving(world, tmp_path, decode_threads=1, request_timeout_s=0.5) as (server, frontend):
        with held_pool(frontend):
            error(post(server, encode(image(8))), 504, "deadline_exceeded")
            # a longer deadline asked for is capped by the setting
            error(post(server, encode(image(8)), **{"X-Request-Timeout": "600"}), 504, "deadline_exceeded")
        for bad in ("soon", "0", "-1", "nan", "inf"):
            error(post(server, encode(image(8)), **{"X-Request-Timeout": bad}), 400, "bad_request")


def test_a_client_gone_before_its_decode_gets_no_decode(
    world: TinyWorld, tmp_path: Path, request_log: RequestLog
) -> None:
    body = encode(image(9))
    raw = (
        f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nX-Domain: birds\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with serving(world, tmp_path, decode_threads=1) as (server, frontend):
        with held_pool(frontend) as release, ThreadPoolExecutor(1) as clients:
            first: Future[httpx.Response] = clients.submit(post, server, encode(image(6)))
            assert jobs_reach(frontend, 1)
            gone = request_log.seen("disconnect")
            with socket.create_connection((server.host, server.port), timeout=ANSWER_S) as client:
                client.sendall(raw)
                assert jobs_reach(frontend, 2)  # read and admitted: its image waits in the scheduler
            # closed: the server cancels the request at once, while the pool is still held
            assert gone.wait(ANSWER_S), "the disconnect was not noticed"
            assert frontend.decoder.images_skipped == 1 and frontend.decoder.jobs == 1
            assert frontend.images_preparing == 1 and frontend.requests_in_flight == 1  # given back
            release.set()
            assert first.result(ANSWER_S).status_code == 200
        assert frontend.decoder.images_skipped == 1
