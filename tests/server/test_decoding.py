"""server.decoding: the decode scheduler runs small requests' images before the rest of large ones, stops
a request's images when it says so, and lets a lone request use every thread (a real thread pool)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from server.decoding import DecodeScheduler, DecodeStopped

WAIT_S = 60.0


def recorder(order: list[str], name: str, gate: threading.Event | None = None) -> Callable[[], None]:
    def run() -> None:
        if gate is not None:
            assert gate.wait(WAIT_S)
        order.append(name)

    return run


async def _started(scheduler: DecodeScheduler, jobs: int) -> None:
    while scheduler.jobs < jobs:  # the jobs are appended by tasks this loop runs: let them run
        await asyncio.sleep(0)


def test_a_small_request_waits_for_one_image_of_a_large_one_not_all() -> None:
    async def scenario() -> list[str]:
        order: list[str] = []
        gate = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            scheduler = DecodeScheduler(pool, threads=1)
            never = lambda: False  # noqa: E731
            held = asyncio.create_task(scheduler.run([(recorder(order, "held", gate), 1)], never))
            await _started(scheduler, 1)
            large = [(recorder(order, f"large{i}"), 100) for i in range(3)]
            big = asyncio.create_task(scheduler.run(large, never))
            await _started(scheduler, 2)
            probe = asyncio.create_task(scheduler.run([(recorder(order, "probe"), 1)], never))
            await _started(scheduler, 3)
            gate.set()
            await asyncio.gather(held, big, probe)
        return order

    # a FIFO pool would give held, large0, large1, large2, probe
    assert asyncio.run(scenario()) == ["held", "large0", "probe", "large1", "large2"]


def test_a_lone_request_uses_every_thread() -> None:
    async def scenario() -> None:
        both = threading.Barrier(2, timeout=WAIT_S)  # passes only if two images decode at once
        with ThreadPoolExecutor(2) as pool:
            scheduler = DecodeScheduler(pool, threads=2)
            await scheduler.run([(both.wait, 1), (both.wait, 1)], lambda: False)  # type: ignore[list-item]

    asyncio.run(scenario())


def test_a_stopped_request_decodes_nothing_more() -> None:
    async def scenario() -> tuple[list[str], int]:
        order: list[str] = []
        stop = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            scheduler = DecodeScheduler(pool, threads=1)

            def first() -> None:
                order.append("first")
                stop.set()  # the client goes while its first image decodes

            tasks = [(first, 1), (recorder(order, "second"), 1), (recorder(order, "third"), 1)]
            with pytest.raises(DecodeStopped):
                await scheduler.run(tasks, stop.is_set)
            assert scheduler.jobs == 0
        return order, scheduler.images_skipped

    assert asyncio.run(scenario()) == (["first"], 2)


def test_a_failing_image_fails_its_request_and_skips_its_other_images() -> None:
    async def scenario() -> tuple[list[str], int]:
        order: list[str] = []
        with ThreadPoolExecutor(1) as pool:
            scheduler = DecodeScheduler(pool, threads=1)

            def corrupt() -> None:
                raise ValueError("corrupt image")

            with pytest.raises(ValueError, match="corrupt image"):
                await scheduler.run([(corrupt, 1), (recorder(order, "next"), 1)], lambda: False)
            await scheduler.run([(recorder(order, "other request"), 1)], lambda: False)  # still serves
        return order, scheduler.images_skipped

    assert asyncio.run(scenario()) == (["other request"], 1)


def test_a_cancelled_request_starts_nothing_more() -> None:
    async def scenario() -> tuple[list[str], int]:
        order: list[str] = []
        gate = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            scheduler = DecodeScheduler(pool, threads=1)
            tasks = [(recorder(order, "first", gate), 1), (recorder(order, "second"), 1)]
            running = asyncio.create_task(scheduler.run(tasks, lambda: False))
            await _started(scheduler, 1)
            running.cancel()  # its deadline passed
            with pytest.raises(asyncio.CancelledError):
                await running
            gate.set()  # the image already decoding finishes; the other never starts
            await scheduler.run([(recorder(order, "after"), 1)], lambda: False)
        return order, scheduler.images_skipped

    assert asyncio.run(scenario()) == (["first", "after"], 1)


def test_one_thread_is_kept_for_small_images_while_large_ones_decode() -> None:
    async def scenario() -> list[str]:
        order: list[str] = []
        gate = threading.Event()
        with ThreadPoolExecutor(2) as pool:
            scheduler = DecodeScheduler(pool, threads=2, small_pixels=10)
            large = [(recorder(order, f"large{i}", gate), 100) for i in range(3)]
            big = asyncio.create_task(scheduler.run(large, lambda: False))
            await _started(scheduler, 1)
            # the large images hold one thread (the other is kept): the probe decodes meanwhile
            await asyncio.wait_for(scheduler.run([(recorder(order, "probe"), 1)], lambda: False), WAIT_S)
            gate.set()
            await big
        return order

    assert asyncio.run(scenario()) == ["probe", "large0", "large1", "large2"]


def test_with_a_large_lane_small_images_use_every_thread_and_large_ones_only_the_lane() -> None:
    async def scenario() -> list[str]:
        order: list[str] = []
        gate = threading.Event()
        both = threading.Barrier(2, timeout=WAIT_S)  # passes only if two small images decode at once
        with ThreadPoolExecutor(2) as pool, ThreadPoolExecutor(1) as lane:
            scheduler = DecodeScheduler(pool, threads=2, small_pixels=10, large_pool=lane, large_threads=1)
            large = [(recorder(order, f"large{i}", gate), 100) for i in range(2)]
            big = asyncio.create_task(scheduler.run(large, lambda: False))
            await _started(scheduler, 1)
            # the lane holds large0 (large1 waits for it, not for the pool): the pool's two threads are free
            small = [(both.wait, 1), (both.wait, 1)]
            await asyncio.wait_for(scheduler.run(small, lambda: False), WAIT_S)  # type: ignore[arg-type]
            order.append("small")
            gate.set()
            await big
        return order

    assert asyncio.run(scenario()) == ["small", "large0", "large1"]


def test_an_inline_request_runs_at_once_on_the_calling_thread_and_stops_like_the_others() -> None:
    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            scheduler = DecodeScheduler(pool, threads=1)
            gate = threading.Event()  # the only thread stays busy: an inline job never needs it
            held = asyncio.create_task(scheduler.run([(recorder([], "held", gate), 1)], lambda: False))
            await _started(scheduler, 1)
            loop_thread, ran_on = threading.get_ident(), []
            await scheduler.run(
                [(lambda: ran_on.append(threading.get_ident()), 1)] * 2, lambda: False, inline=True
            )
            assert ran_on == [loop_thread, loop_thread] and scheduler.images_decoded == 2
            assert scheduler.jobs == 1  # it never queued

            def corrupt() -> None:
                raise ValueError("corrupt")

            with pytest.raises(ValueError, match="corrupt"):  # the task's own error, as from the pool
                await scheduler.run([(corrupt, 1)], lambda: False, inline=True)
            with pytest.raises(DecodeStopped):  # its request gave up before it started
                await scheduler.run([(recorder([], "late"), 1)] * 3, lambda: True, inline=True)
            assert scheduler.images_skipped == 3 and scheduler.images_decoded == 3
            gate.set()
            await held

    asyncio.run(scenario())
