"""Pixels in shared memory: one slab per front end, leased per request, read in place by the engine.

    front end                                   engine
    slab = PixelSlab.create(bytes)              reader = SlabReader()
    lease = slab.lease(n, side)  # or None: full
    lease.array[i] = decoded uint8 [side, side, 3]
    send {"slab": slab.name, "offset", "count", "side"}  ──>  reader.view(name, offset, count, side)
    ... reply ...                                             (stacked into the batch, then answered)
    lease.release()

A request's images occupy one contiguous range of the slab (first fit over a free list), so the engine
sees them as one numpy array without copying. The slab is written only by its front end and released
only after the engine's reply, so the engine never reads a range being rewritten.

Written here rather than taken from a library: multiprocessing.shared_memory gives the segment, and the
allocator over it is forty lines; the well-kept allocators (e.g. Arrow's plasma, Ray's object store)
bring a whole object-store service with them.
"""

from __future__ import annotations

import bisect
import contextlib
import secrets
import threading
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory

import numpy as np

_ALIGN = 64


def _untrack(shm: shared_memory.SharedMemory) -> None:
    # Python < 3.13 registers every attached segment with the resource tracker, which unlinks it when
    # *this* process exits: an engine restart would delete its front ends' slabs. The creator alone
    # owns (and unlinks) a slab.
    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]


@dataclass
class Lease:
    slab: PixelSlab
    offset: int
    nbytes: int
    array: np.ndarray
    """uint8 [count, side, side, 3], a view into the slab."""

    def release(self) -> None:
        self.slab._free(self.offset, self.nbytes)


class PixelSlab:
    """A front end's shared-memory slab and its allocator (thread-safe)."""

    def __init__(self, shm: shared_memory.SharedMemory, owner: bool) -> None:
        self._shm = shm
        self._owner = owner
        self.size = shm.size
        self._lock = threading.Lock()
        self._free_starts: list[int] = [0]
        self._free_sizes: dict[int, int] = {0: shm.size}

    @classmethod
    def create(cls, size: int, prefix: str = "md") -> PixelSlab:
        name = f"{prefix}-{secrets.token_hex(6)}"
        return cls(shared_memory.SharedMemory(name=name, create=True, size=size), owner=True)

    @property
    def name(self) -> str:
        return self._shm.name

    def lease(self, count: int, side: int) -> Lease | None:
        """Room for `count` images of side x side x 3 bytes, or None when the slab has no such range."""
        nbytes = count * side * side * 3
        need = -(-max(nbytes, 1) // _ALIGN) * _ALIGN
        with self._lock:
            for start in self._free_starts:
                size = self._free_sizes[start]
                if size >= need:
                    self._free_starts.remove(start)
                    del self._free_sizes[start]
                    if size > need:
                        self._insert(start + need, size - need)
                    break
            else:
                return None
        assert self._shm.buf is not None
        array = np.ndarray((count, side, side, 3), dtype=np.uint8, buffer=self._shm.buf, offset=start)
        return Lease(self, start, need, array)

    def free_bytes(self) -> int:
        with self._lock:
            return sum(self._free_sizes.values())

    def _insert(self, start: int, size: int) -> None:
        bisect.insort(self._free_starts, start)
        self._free_sizes[start] = size

    def _free(self, start: int, size: int) -> None:
        with self._lock:
            i = bisect.bisect_left(self._free_starts, start)
            # coalesce with the next and the previous free range
            if i < len(self._free_starts) and self._free_starts[i] == start + size:
                size += self._free_sizes.pop(self._free_starts.pop(i))
            if i > 0:
                prev = self._free_starts[i - 1]
                if prev + self._free_sizes[prev] == start:
                    self._free_sizes[prev] += size
                    return
            self._insert(start, size)

    def close(self) -> None:
        self._shm.close()
        if self._owner:
            self._shm.unlink()


class SlabReader:
    """The engine's side: front ends' slabs attached by name (once each), read as numpy views."""

    def __init__(self, untrack: bool = True) -> None:
        self._attached: dict[str, shared_memory.SharedMemory] = {}
        self._untrack = untrack
        """False only where the creator is this same process (tests): the tracker holds one entry per name."""

    def view(self, name: str, offset: int, count: int, side: int) -> np.ndarray:
        shm = self._attached.get(name)
        if shm is None:
            if not name.startswith("md-"):
                raise ValueError(f"{name!r} is not a front end's pixel slab")
            shm = shared_memory.SharedMemory(name=name)
            if self._untrack:
                _untrack(shm)
            self._attached[name] = shm
        nbytes = count * side * side * 3
        if offset < 0 or count < 1 or side < 1 or offset + nbytes > shm.size:
            raise ValueError(f"pixels [{offset}, {offset + nbytes}) lie outside slab {name!r}")
        assert shm.buf is not None
        return np.ndarray((count, side, side, 3), dtype=np.uint8, buffer=shm.buf, offset=offset)

    def close(self) -> None:
        for shm in self._attached.values():
            with contextlib.suppress(BufferError):  # a view is still alive (the process is exiting anyway)
                shm.close()
        self._attached.clear()
