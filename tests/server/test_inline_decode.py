"""Small requests (bodies of at most 16 KiB, at most `inline_decode_pixels` pixels) have their headers read
and their images decoded on the event loop; the others still go through the header pool and the decode
scheduler. Real uvicorn on loopback (`tests.server.test_decode_budget.serving`); the pools are held by jobs
that wait on an event, so a request that needs them cannot be answered until the test lets them go."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

from server.routes.classify import INLINE_BODY_BYTES
from server.settings import Settings
from tests.server.conftest import TinyWorld, encode, image
from tests.server.test_decode_budget import ANSWER_S, error, held_pool, jobs_reach, post, serving
from tests.server.test_large_decode_lane import held

DEFAULT = Settings.model_fields["inline_decode_pixels"].default


def test_a_small_request_is_answered_while_every_pool_is_busy(world: TinyWorld, tmp_path: Path) -> None:
    small = encode(image(1))  # 40 x 32, a few KiB
    assert len(small) <= INLINE_BODY_BYTES
    with (
        serving(world, tmp_path, decode_threads=1, inline_decode_pixels=DEFAULT) as (server, frontend),
        held_pool(frontend),
        held(frontend.header_pool),
    ):
        decoded = frontend.decoder.images_decoded
        r = post(server, small)
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["top_k"]
        assert frontend.decoder.images_decoded == decoded + 1  # counted as the pool's decodes are
        # a corrupt small image is refused from the loop as from the pool
        error(post(server, small[: len(small) // 2]), 422, "corrupt_image")
        assert frontend.pixels_decoding == 0 and frontend.images_preparing == 0


def test_a_body_over_the_bound_has_its_header_read_in_the_header_pool(
    world: TinyWorld, tmp_path: Path
) -> None:
    large_body = encode(image(2, (80, 80)))  # random pixels: ~19 KiB of PNG, yet only 6400 pixels
    assert len(large_body) > INLINE_BODY_BYTES
    with (
        serving(world, tmp_path, decode_threads=1, inline_decode_pixels=DEFAULT) as (server, frontend),
        held(frontend.header_pool) as release,
        ThreadPoolExecutor(1) as clients,
    ):
        waiting: Future[httpx.Response] = clients.submit(post, server, large_body)
        assert post(server, encode(image(3))).status_code == 200  # a small one passes it
        assert not waiting.done()  # its header cannot be read while the pool is held
        release.set()
        assert waiting.result(ANSWER_S).status_code == 200


def test_a_small_body_of_many_pixels_is_decoded_in_the_pool(world: TinyWorld, tmp_path: Path) -> None:
    flat = encode(Image.new("RGB", (200, 200), (90, 120, 30)))  # well under 1 KiB, 40 000 pixels
    assert len(flat) <= INLINE_BODY_BYTES and DEFAULT < 200 * 200
    with (
        serving(world, tmp_path, decode_threads=1, inline_decode_pixels=DEFAULT) as (server, frontend),
        held_pool(frontend) as release,
        ThreadPoolExecutor(1) as clients,
    ):
        waiting: Future[httpx.Response] = clients.submit(post, server, flat)
        assert jobs_reach(frontend, 1), "the request's image did not reach the decode scheduler"
        assert post(server, encode(image(4))).status_code == 200  # small: not behind it
        assert not waiting.done()
        release.set()
        assert waiting.result(ANSWER_S).status_code == 200


def test_with_the_setting_0_every_request_uses_the_pools(world: TinyWorld, tmp_path: Path) -> None:
    with (
        serving(world, tmp_path, decode_threads=1, inline_decode_pixels=0) as (server, frontend),
        held_pool(frontend) as release,
        ThreadPoolExecutor(1) as clients,
    ):
        waiting: Future[httpx.Response] = clients.submit(post, server, encode(image(5)))
        assert jobs_reach(frontend, 1)
        release.set()
        assert waiting.result(ANSWER_S).status_code == 200
