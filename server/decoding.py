"""The front end's decode scheduler: requests' images decoded in the thread pool, small requests first.

A request hands over one task per image. At most `threads` images decode at once; when a thread frees up,
the next image comes from the request that has had the fewest pixels decoded so far and has none decoding
now (least attained service), so a probe never waits for the rest of a large request: with a plain FIFO
pool, two requests of 64 images near the pixel limit made a one-image probe wait 18.6 s. Images of more
than `small_pixels` take at most `threads - 1` threads (when there are two or more): one thread is always
left for small images, so a probe does not even wait for one large decode (up to a few seconds each at
the pixel limit) but only for other small images. The price: a lone request of large images decodes on
one thread fewer. Under a steady stream of small requests a large one can wait; admission
(`FrontEnd.max_pixels_decoding`) and its deadline bound that.

Before each image the request's `should_stop` is asked (its client is gone, its deadline passed): the
images not yet started are then never decoded (a PIL decode cannot be stopped once running).

With a large lane (`large_pool`, `large_threads`; the front end makes one when `MD_LARGE_DECODE_NICE` is
not 0) large images decode there instead, in a pool of their own whose threads run at a lower OS priority
(`lower_thread_priority`), and small images use all `threads` of the main pool. The large lane's work then
yields the CPU: when the cores are contended the engine, the event loop and small decodes run first, and
when they are idle a large image decodes at full speed (cheap work first: what minimises everyone's
latency). A pixel flood (40 Mpx 16-bit PNGs, 0.4 CPU-s each before they decoded straight to 8 bits, 0.13
since) took one of two cores from the well-behaved clients while it decoded at normal priority.

A request the caller finds cheap enough (`inline`: a few small images) is decoded at once on the event
loop, skipping the queue: it would only wait behind others for a thread hand-off that costs more than its
decode.

Only the event loop changes the scheduler's state; the pools run the tasks. `changed` is notified when a
request's job arrives or ends, so tests and benchmarks can wait on `jobs` from another thread.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

log = logging.getLogger(__name__)


def lower_thread_priority(nice: int) -> None:
    """Lower the calling thread's OS scheduling priority to `nice` (a large decode lane's initializer).

    On Linux nice is per thread (`setpriority` on the thread's id). A real-time thread (the benches run
    under `chrt -r 10`, which every thread inherits) ignores nice, so it first leaves RT for SCHED_OTHER,
    which is always allowed. Elsewhere (macOS: a thread id is not a process id there) it does nothing.

    Nice rather than SCHED_IDLE: both keep a non-zero share under CFS/EEVDF, but SCHED_IDLE's weight (3,
    against 1024 at nice 0) leaves a legitimate large request next to nothing while the cores are busy
    with anything, even another tenant's batch job, and its deadline (`MD_REQUEST_TIMEOUT_S`) would then
    pass; nice 19 (weight 15) gives the flood about 1.5 % of a contended core, and a setting between 1 and
    19 lets an operator trade the two. Raising one's own nice needs no privilege; it is never lowered.
    """
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    try:
        if os.sched_getscheduler(0) in (os.SCHED_FIFO, os.SCHED_RR):
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError as exc:  # a sandbox without the syscalls: decode at normal priority rather than fail
        log.warning("large decodes keep their priority (cannot set nice %d: %s)", nice, exc)


class DecodeStopped(Exception):
    """A request's remaining images were not decoded: its `should_stop` said so."""


@dataclass(eq=False)
class _Job:
    tasks: list[tuple[Callable[[], None], int]]
    """(decode one image, its pixels), in order; taken from the front."""
    should_stop: Callable[[], bool]
    done: asyncio.Future[None]
    order: int
    served_pixels: int = 0
    decoding: int = 0
    failed: BaseException | None = None
    """Why the rest of the job is not run: its first task's exception, or DecodeStopped."""


class DecodeScheduler:
    def __init__(
        self,
        pool: Executor,
        threads: int,
        small_pixels: int | None = None,
        *,
        large_pool: Executor | None = None,
        large_threads: int = 1,
    ) -> None:
        self.pool = pool
        self.threads = threads
        self.small_pixels = small_pixels
        """Images of more pixels are large: in `large_pool` when there is one (at most `large_threads` at
        once), else at most `threads - 1` of them decode at once in `pool`. None: no image is large."""
        self.large_pool = large_pool
        self.large_threads = large_threads
        self._jobs: list[_Job] = []
        self._decoding = 0
        self._decoding_large = 0
        self._order = itertools.count()
        self.images_decoded = 0
        self.images_skipped = 0
        """Images never decoded because their request stopped first (client gone, deadline passed)."""
        self.changed = threading.Condition()

    @property
    def jobs(self) -> int:
        """Requests whose images are waiting or decoding."""
        return len(self._jobs)

    def _notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    async def run(
        self,
        tasks: list[tuple[Callable[[], None], int]],
        should_stop: Callable[[], bool],
        *,
        inline: bool = False,
    ) -> None:
        """Run each `(task, pixels)` in the pool; raises the first task's exception, or DecodeStopped.
        `inline`: run them here, on the event loop, at once (a request too cheap to hand to a thread; its
        caller bounds the cost), counted as the pool's are."""
        if not tasks:
            return
        if inline:
            if should_stop():
                self.images_skipped += len(tasks)
                raise DecodeStopped()
            for task, _ in tasks:
                self.images_decoded += 1
                task()
            return
        job = _Job(list(tasks), should_stop, asyncio.get_running_loop().create_future(), next(self._order))
        self._jobs.append(job)
        self._notify()
        self._pump()
        try:
            await job.done
        except asyncio.CancelledError:  # the request was cancelled (its deadline): start nothing more of it
            self._stop(job, DecodeStopped())
            raise

    def _stop(self, job: _Job, reason: BaseException) -> None:
        self.images_skipped += len(job.tasks)
        job.tasks.clear()
        if job.failed is None:
            job.failed = reason
        self._settle(job)

    def _settle(self, job: _Job) -> None:
        """Answer the job once nothing of it is left to start or running."""
        if job.tasks or job.decoding:
            return
        if job in self._jobs:
            self._jobs.remove(job)
            self._notify()
        if not job.done.done():
            if job.failed is not None:
                job.done.set_exception(job.failed)
            else:
                job.done.set_result(None)

    def _large(self, pixels: int) -> bool:
        return self.small_pixels is not None and pixels > self.small_pixels

    def _has_room(self, large: bool) -> bool:
        """Whether an image of this size may start now."""
        if self.large_pool is not None:  # two lanes, each with its own threads
            if large:
                return self._decoding_large < self.large_threads
            return self._decoding - self._decoding_large < self.threads
        if self._decoding >= self.threads:
            return False
        return not large or self.threads == 1 or self._decoding_large < self.threads - 1

    def _next(self) -> _Job | None:
        ready = [j for j in self._jobs if j.tasks and self._has_room(self._large(j.tasks[0][1]))]
        idle = [j for j in ready if j.decoding == 0]
        return min(idle or ready, key=lambda j: (j.served_pixels, j.order), default=None)

    def _pump(self) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            if job.should_stop():
                self._stop(job, DecodeStopped())
                continue
            task, pixels = job.tasks.pop(0)
            large = self._large(pixels)
            job.decoding += 1
            job.served_pixels += pixels
            self._decoding += 1
            self._decoding_large += large
            pool = self.large_pool if large and self.large_pool is not None else self.pool
            running = asyncio.get_running_loop().run_in_executor(pool, task)
            running.add_done_callback(functools.partial(self._finished, job, large))

    def _finished(self, job: _Job, large: bool, running: asyncio.Future[None]) -> None:
        self._decoding -= 1
        self._decoding_large -= large
        job.decoding -= 1
        self.images_decoded += 1
        failure = asyncio.CancelledError() if running.cancelled() else running.exception()
        if failure is not None:
            self._stop(job, failure)
        else:
            self._settle(job)
        self._pump()
