"""Dynamic batching: images of any domains queue and run together, one forward at a time.

A batch closes when it holds `max_batch_size` images, or `max_wait_ms` after it could first have started:
after its first image arrived or the worker became free, whichever is later. The second rule matters under
load: the images queued while the previous batch ran are all "old", and without a short window after the
worker frees up, the clients just answered would miss the next batch and batches would stay half full.
Images in one batch share an input size (domains may differ in it) and use at most
`max_domains_per_batch` distinct domain versions (what the engine's bank can hold at once: its caller
passes the bank's slot count); the others wait for the next batch, in order.
When `max_queue` images are waiting, `submit` refuses with `QueueFull` (429) instead of growing memory.
An image whose request's deadline has passed, or whose future was cancelled (its in-process caller is
gone), is dropped when a batch is formed instead of being run: its future gets `DeadlineExceeded`.

Threads make a pipeline: the stager forms a batch and makes its network input (the stack out of the
front ends' shared memory, the copy to the device, the normalisation), and `streams` runners (the
engine's: one forward each at a time, concurrently; `Engine.streams`) run the forwards. While a runner is
idle the stager forms a batch by the rules above. While every runner is busy it forms the next batch when
a full one is queued, or when the first running batch is expected to end (its images x the recent time
per image) within the time staging takes: a partial batch formed any earlier would miss the images
arriving meanwhile, and one formed only once a runner is free would leave it idle through the wait window
and the staging (about 9% of the time with 32 closed-loop clients on 2 cores, measured as the engine's
busy fraction of 0.91). A runner that frees before its batch was expected to end gets what is queued at
once, without a wait window: staging ahead would have taken just that. So a saturated engine hardly waits
for its next input; an idle one still gives a first image `max_wait_ms` to find company. With several
streams, each batch holds at most `max_domains_per_batch` domains (the caller passes bank_slots //
streams), so the batches running at once always fit the bank together.

`submit` returns concurrent futures, so synchronous callers (benchmarks, the reliability suite) can use it
as well as the event loop (`classify` wraps them for asyncio).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from server.engine import DomainKey, Engine, Prediction
from server.errors import DeadlineExceeded, NonFiniteOutput, QueueFull


class BatchEvents:
    """Hooks for metrics; the defaults do nothing."""

    def batch_run(self, size: int, domains: int, seconds: float) -> None: ...
    def queue_wait(self, seconds: float) -> None: ...
    def queue_depth(self, images: int) -> None: ...


@dataclass
class _Item:
    key: DomainKey
    image: np.ndarray | Tensor
    """uint8 [S, S, 3]: possibly a view into a front end's shared-memory slab, read only when batched, or
    a crop the engine decoded on its device (`server.device_jpeg`)."""
    top_k: int
    future: Future[Prediction]
    enqueued: float
    deadline: float | None = None
    """time.monotonic() past which the image is dropped instead of run (its request gave up)."""


class Batcher:
    def __init__(
        self,
        engine: Engine,
        *,
        max_domains_per_batch: int,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 512,
        events: BatchEvents | None = None,
        streams: int | None = None,
    ) -> None:
        """`streams`: runner threads (default: the engine's `streams`)."""
        if max_domains_per_batch < 1:
            raise ValueError("max_domains_per_batch must be >= 1")
        self.engine = engine
        self.streams = streams if streams is not None else engine.streams
        if self.streams < 1:
            raise ValueError("streams must be >= 1")
        self.max_domains_per_batch = max_domains_per_batch
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.events = events or BatchEvents()
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._staged: queue.Queue[tuple[list[_Item], Tensor | None] | None] = queue.Queue(maxsize=1)
        self._threads: list[threading.Thread] = []
        self.last_batch_seconds = 0.05
        self._running: dict[int, float] = {}
        """Runner -> when its running batch should end (its start + its images x `_seconds_per_image`;
        guarded by `_cond`)."""
        self._seconds_per_image = 0.0
        """Runner time per image of recent batches, per stream (smoothed; guarded by `_cond`)."""
        self._stage_seconds = 0.0
        """How long forming and staging a batch takes (smoothed; guarded by `_cond`)."""
        self._free_since = 0.0
        """When a runner last finished a batch (guarded by `_cond`)."""
        self._pending = 0
        """Staged batches not yet taken by a runner (guarded by `_cond`)."""

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        if not self._threads:
            self._stopping = False
            self._threads = [
                threading.Thread(target=self._stage, name="batch-stager", daemon=True),
                *(
                    threading.Thread(target=self._run, args=(i,), name=f"inference-worker-{i}", daemon=True)
                    for i in range(self.streams)
                ),
            ]
            for thread in self._threads:
                thread.start()

    def stop(self) -> None:
        """Finish nothing new: fail what is queued and join the worker."""
        with self._cond:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for item in pending:
            with contextlib.suppress(InvalidStateError):  # cancelled by its caller meanwhile
                item.future.set_exception(RuntimeError("the server is shutting down"))
        for thread in self._threads:
            thread.join(timeout=30)
        self._threads = []

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    # -- submitting -------------------------------------------------------------------------------
    def submit(
        self,
        key: DomainKey,
        images: Sequence[np.ndarray] | np.ndarray | Tensor,
        top_k: int = 5,
        deadline: float | None = None,
    ) -> list[Future[Prediction]]:
        """Queue uint8 crops [S, S, C] of one domain version (`domain_format.preprocess.prepare`); all or none.
        Those still queued at `deadline` (time.monotonic()) are dropped with DeadlineExceeded."""
        now = time.monotonic()
        items = [_Item(key, img, top_k, Future(), now, deadline) for img in images]
        with self._cond:
            if self._stopping:
                raise RuntimeError("the batcher is stopped")
            if len(self._queue) + len(items) > self.max_queue:
                raise QueueFull(
                    f"the inference queue is full ({len(self._queue)} waiting, limit {self.max_queue})",
                    retry_after=self.retry_after(),
                )
            self._queue.extend(items)
            depth = len(self._queue)
            self._cond.notify()
        self.events.queue_depth(depth)
        return [item.future for item in items]

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained: whole seconds, at least one."""
        batches = len(self._queue) / max(1, self.max_batch_size)
        return max(1, int(batches * self.last_batch_seconds / self.streams + 0.999))

    async def classify(
        self, key: DomainKey, images: Sequence[np.ndarray] | np.ndarray, top_k: int = 5
    ) -> list[Prediction]:
        futures = self.submit(key, images, top_k)
        return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))

    # -- the worker -------------------------------------------------------------------------------
    def _take_batch(self) -> list[_Item] | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            # While every runner is busy (or has a staged batch waiting for it), the next batch is formed
            # when a full one is queued, or once the first running batch is expected to end within the
            # time staging takes: then that runner starts the next batch the moment it is free instead of
            # idling through a wait window and the staging. (Formed earlier, a partial batch would leave
            # out the images arriving meanwhile.)
            ahead = False
            while self._all_claimed() and len(self._queue) < self.max_batch_size and not self._stopping:
                ahead = True
                if self._pending:  # a batch is staged already: the next one follows it, not this one
                    self._cond.wait()
                    continue
                remaining = min(self._running.values()) - self._stage_seconds - time.monotonic()
                if remaining <= 0:
                    return self._select()
                self._cond.wait(remaining)
            if self._stopping:
                return None
            if ahead:
                # A runner freed before its batch was expected to end: what is queued is what staging
                # ahead would have taken (the freed batch's clients are not back yet), so it goes now;
                # a wait window here idled the runner ~14 ms in every other batch on 2 cores.
                return self._select()
            deadline = max(self._queue[0].enqueued, self._free_since) + self.max_wait
            while len(self._queue) < self.max_batch_size and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._stopping:
                return None
            return self._select()

    def _all_claimed(self) -> bool:
        """Every runner is running a batch or has a staged one waiting for it (`_cond` held)."""
        return len(self._running) + self._pending >= self.streams

    def _select(self) -> list[_Item]:
        """Take compatible items in queue order (same input shape, at most max_domains_per_batch domain versions)."""
        shape = self._queue[0].image.shape
        keys: set[DomainKey] = set()
        taken: list[_Item] = []
        left: deque[_Item] = deque()
        now = time.monotonic()
        while self._queue and len(taken) < self.max_batch_size:
            item = self._queue.popleft()
            if _given_up(item, now):
                continue
            fits = item.image.shape == shape and (item.key in keys or len(keys) < self.max_domains_per_batch)
            if fits:
                # marked running: from here its caller can no longer cancel it (False: it just did)
                if not item.future.set_running_or_notify_cancel():
                    continue
                keys.add(item.key)
                taken.append(item)
            else:
                left.append(item)
        left.extend(self._queue)
        self._queue = left
        return taken

    def _stage(self) -> None:
        """Form the next batch and make its network input (stack out of the slabs, copy to the device,
        normalise) while the runners run theirs."""
        while True:
            batch = self._take_batch()
            if batch is None:
                self._staged.put(None)
                return
            if not batch:  # every image it looked at was given up (deadline passed, caller gone)
                continue
            x: Tensor | None
            started = time.monotonic()
            try:
                x = self.engine.network_input([i.key for i in batch], self._pixels(batch))
            except Exception:  # e.g. a version deleted meanwhile: the runner isolates it per domain
                x = None
            staging = time.monotonic() - started
            with self._cond:
                self._stage_seconds = 0.8 * self._stage_seconds + 0.2 * staging  # a smoothed estimate
                self._pending += 1  # claims a runner from here on: no partial batch forms early for it
            self._staged.put((batch, x))

    def _run(self, index: int) -> None:
        """One stream: take the next staged batch, run it, answer it."""
        self.engine.enter_stream()
        while True:
            staged = self._staged.get()
            if staged is None:
                self._staged.put(None)  # for the other runners
                return
            batch, x = staged
            started = time.monotonic()
            with self._cond:
                self._pending -= 1
                self._running[index] = started + len(batch) * self._seconds_per_image
                self._cond.notify_all()
            for item in batch:
                self.events.queue_wait(started - item.enqueued)
            try:
                self._run_batch(batch, x)
            finally:
                finished = time.monotonic()
                seconds = finished - started
                with self._cond:
                    self.last_batch_seconds = seconds
                    self._seconds_per_image = 0.7 * self._seconds_per_image + 0.3 * seconds / len(batch)
                    del self._running[index]  # before the stager's next put: never a stale "idle"
                    self._free_since = finished
                    self._cond.notify_all()
            self.events.batch_run(len(batch), len({i.key for i in batch}), seconds)

    def _pixels(self, batch: list[_Item]) -> Tensor:
        """The batch's crops as one uint8 tensor [B, S, S, 3]: the one copy out of the slabs, or joined
        on the device where the engine decoded some of them."""
        images = [i.image for i in batch]
        if all(isinstance(i, np.ndarray) for i in images):
            return torch.from_numpy(np.stack(images))  # type: ignore[arg-type]
        device = self.engine.device
        return torch.stack([torch.as_tensor(i).to(device, non_blocking=True) for i in images])

    def _run_batch(self, batch: list[_Item], x: Tensor | None = None) -> None:
        keys = [i.key for i in batch]
        try:
            if x is None:
                x = self.engine.network_input(keys, self._pixels(batch))
            preds = self.engine.infer(keys, x, [i.top_k for i in batch])
        except NonFiniteOutput as exc:  # those rows fail (a 5xx of their own); the others are answered
            for item, pred in zip(batch, exc.predictions, strict=True):
                if pred is None:
                    item.future.set_exception(NonFiniteOutput(exc.message))
                else:
                    item.future.set_result(pred)
            return
        except Exception as exc:
            if len(set(keys)) > 1:  # isolate the failing domain: the others still get answers
                for key in set(keys):
                    self._run_batch([i for i in batch if i.key == key])
                return
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        for item, pred in zip(batch, preds, strict=True):
            item.future.set_result(pred)


def _given_up(item: _Item, now: float) -> bool:
    """Whether a queued image's request gave up on it: its deadline passed (it is answered with
    DeadlineExceeded here) or its caller cancelled its future."""
    if item.future.cancelled():
        return True
    if item.deadline is not None and now >= item.deadline:
        with contextlib.suppress(InvalidStateError):  # cancelled by its caller meanwhile
            item.future.set_exception(DeadlineExceeded("the request's deadline passed while it was queued"))
        return True
    return False
