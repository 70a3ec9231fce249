"""The large images' decode lane (`MD_LARGE_DECODE_NICE`): its threads run at the configured nice, a large
image decodes there while the decode pool is busy (and on an idle server), a small image never waits for
it, and the setting 0 keeps one shared pool (large images then wait for its threads, as before).

Real uvicorn on loopback with the real front end's pools; where something must wait, a pool's threads are
held by jobs that wait on an event (`held_pool`), and what a test waits for is an answer.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from server.decoding import lower_thread_priority
from tests.server.conftest import TinyWorld, encode, image
from tests.server.test_decode_budget import ANSWER_S, held_pool, jobs_reach, post, serving

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="nice is per thread on Linux only"
)

SHARE = 200_000
"""`max_pixels_decoding` here: images over 3125 pixels (1/64 of it) are large."""
LARGE = (400, 300)
SMALL = (20, 16)


def thread_nice(tid: int) -> int:
    """A thread's nice as the kernel reports it: field 19 of /proc/self/task/<tid>/stat."""
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[16])  # fields after the command name start at 3


def nice_in(pool: ThreadPoolExecutor) -> set[int]:
    """The nice of every thread of `pool` (all held at once, so each reports its own)."""
    workers: int = pool._max_workers  # what the pool was made with
    met = threading.Barrier(workers, timeout=ANSWER_S)

    def report() -> int:
        met.wait()
        return thread_nice(threading.get_native_id())

    return {f.result(ANSWER_S) for f in [pool.submit(report) for _ in range(workers)]}


@contextmanager
def held(pool: ThreadPoolExecutor) -> Iterator[threading.Event]:
    """Every thread of `pool` busy until the event is set (set on exit too)."""
    release = threading.Event()
    holders = [pool.submit(release.wait) for _ in range(pool._max_workers)]
    try:
        yield release
    finally:
        release.set()
        for holder in holders:
            holder.result(timeout=ANSWER_S)


@linux_only
@pytest.mark.parametrize("decode_threads", [1, 3])
def test_the_lane_runs_at_the_configured_nice_and_the_pool_does_not(
    world: TinyWorld, tmp_path: Path, decode_threads: int
) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)  # the test run's own nice (0, or more under `nice`)
    with serving(world, tmp_path, decode_threads=decode_threads, large_decode_nice=19) as (_, frontend):
        assert frontend.large_pool is not None
        assert frontend.large_pool._max_workers == max(1, decode_threads - 1)
        assert nice_in(frontend.large_pool) == {19}
        assert nice_in(frontend.pool) == {base}
        assert thread_nice(threading.get_native_id()) == base  # the caller's thread is untouched


@linux_only
def test_a_real_time_thread_leaves_real_time_before_taking_its_nice() -> None:
    """Under `chrt -r` (the benches) every thread is real-time, where nice means nothing."""
    if os.sched_getscheduler(0) not in (os.SCHED_FIFO, os.SCHED_RR):
        try:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))
        except PermissionError:
            pytest.skip("making a real-time thread needs root (CAP_SYS_NICE)")
        restore = True
    else:
        restore = False
    try:
        with ThreadPoolExecutor(1, initializer=lower_thread_priority, initargs=(17,)) as lane:
            policy, nice = lane.submit(
                lambda: (os.sched_getscheduler(0), thread_nice(threading.get_native_id()))
            ).result(ANSWER_S)
        assert (policy, nice) == (os.SCHED_OTHER, 17)
    finally:
        if restore:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def test_a_large_image_decodes_in_the_lane_while_the_decode_pool_is_busy(
    world: TinyWorld, tmp_path: Path
) -> None:
    with serving(world, tmp_path, decode_threads=1, max_pixels_decoding=SHARE) as (server, frontend):
        with held(frontend.pool):
            assert post(server, encode(image(4, LARGE))).status_code == 200
        assert frontend.decoder.images_decoded == 1 and frontend.pixels_decoding == 0


def test_a_large_image_decodes_on_an_idle_server(world: TinyWorld, tmp_path: Path) -> None:
    with serving(world, tmp_path, max_pixels_decoding=SHARE) as (server, frontend):
        answers = [post(server, encode(image(seed, LARGE))) for seed in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert frontend.decoder.images_decoded == 3


def test_a_small_image_never_waits_for_the_lane(world: TinyWorld, tmp_path: Path) -> None:
    with serving(world, tmp_path, decode_threads=2, max_pixels_decoding=SHARE) as (server, frontend):
        assert frontend.large_pool is not None
        with held(frontend.large_pool) as release, ThreadPoolExecutor(1) as clients:
            large: Future[httpx.Response] = clients.submit(post, server, encode(image(4, LARGE)))
            assert jobs_reach(frontend, 1), "the large request was not admitted"
            # the lane is held and a large image waits for it: small ones still use both decode threads
            for seed in range(3):
                assert post(server, encode(image(seed, SMALL))).status_code == 200
            assert not large.done()
            release.set()
            assert large.result(ANSWER_S).status_code == 200


def test_nice_0_keeps_one_shared_pool(world: TinyWorld, tmp_path: Path) -> None:
    """Today's behaviour: no lane; a large image takes one of the decode pool's threads, so it waits while
    they are busy."""
    with serving(world, tmp_path, decode_threads=1, max_pixels_decoding=SHARE, large_decode_nice=0) as (
        server,
        frontend,
    ):
        assert frontend.large_pool is None and frontend.decoder.large_pool is None
        with held_pool(frontend) as release, ThreadPoolExecutor(1) as clients:
            large: Future[httpx.Response] = clients.submit(post, server, encode(image(4, LARGE)))
            assert jobs_reach(frontend, 1), "the large request was not admitted"
            assert not large.done()
            release.set()
            assert large.result(ANSWER_S).status_code == 200
        if sys.platform.startswith("linux"):
            assert nice_in(frontend.pool) == {os.getpriority(os.PRIO_PROCESS, 0)}
