"""Residency: which domain version is in which bank slot, and the artifacts on their way in.

The one table of residency (the network's bank holds the tensors; this says whose they are):
resident versions in least-recently-used order; when a slot is needed, `server.eviction` picks the victim
(`bank_eviction`: least frequently used with aging by default, or least recently used). A miss reads the artifact
from the store once however many callers wait for it (single-flight); `prefetch` reads a cold domain
ahead of its batch and stages it, so the inference worker only copies it in. The domains whose merged
(folded) weights are kept, in LRU order, bounded by `merged_cache`, are this table's too.

Deletion: `drop(domain)` frees the domain's slots and its staged artifacts, and counts a drop for the
domain; an artifact read before the latest drop is never staged or loaded (the store is read again,
and a deleted version is then not found), so a request queued before its domain was deleted cannot bring
it back into the bank.

Locking: `ensure`, `load`, `drop`, `unpinned` and `use_merged` change the bank and run with the engine's
bank lock held; the tables themselves are guarded by this object's lock, so store reads (`fetch`,
`prefetch`) run outside the bank lock. Forwards run concurrently, outside the bank lock, on slots the
engine has pinned (`pinned`: slot -> running forwards): a pinned slot is never evicted, overwritten or
unmerged. When every victim is pinned, `ensure` raises `SlotsPinned` and the engine waits for a forward
to end; a dropped domain's pinned slots are retired (out of the table, not reusable) and cleared by
`unpinned` once their last forward ends.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from safetensors.torch import load as load_safetensors  # safetensors only: never pickle
from torch import Tensor

from adapters_store.manifest import DomainManifest
from adapters_store.store import AdapterStore
from model_artifacts import adapter_config
from residual_adapters import AdapterConfig, DomainMismatch, MultiDomainNet
from server.errors import DomainUnavailable, EngineError
from server.eviction import EvictionName, EvictionPolicy, eviction_policy
from server.versions import DomainKey


class EngineEvents:
    """Hooks the engine calls; the server's metrics override them. The defaults do nothing."""

    def bank_hit(self, key: DomainKey) -> None: ...
    def bank_miss(self, key: DomainKey) -> None: ...
    def bank_load(self, key: DomainKey, seconds: float) -> None: ...
    def bank_evict(self, key: DomainKey) -> None: ...
    def domain_dropped(self, key: DomainKey) -> None:
        """A version left the bank (eviction, deletion or a store change)."""

    def resident_changed(self, count: int) -> None: ...


@dataclass
class EngineStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    load_seconds: list[float] = field(default_factory=list)


@dataclass
class Fetched:
    """One artifact read from the store and parsed, ready to be copied into a slot."""

    manifest: DomainManifest
    config: AdapterConfig
    tensors: dict[str, Tensor]
    drops: int
    """The domain's drop count when the read began (stale once it changes)."""


class SlotsPinned(Exception):
    """Every slot a load could take is pinned by a running forward: wait for one to end and retry."""


@dataclass
class _Slot:
    index: int
    manifest: DomainManifest


class Residency:
    def __init__(
        self,
        store: AdapterStore,
        net: MultiDomainNet,
        *,
        slots: int,
        merged_cache: int,
        verify_checksums: bool,
        events: EngineEvents,
        eviction: EvictionName = "lfu",
        pinned: Mapping[int, int] | None = None,
    ) -> None:
        self.store = store
        self.net = net
        self.slots = slots
        self.merged_cache = merged_cache
        self.verify_checksums = verify_checksums
        self.events = events
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._resident: OrderedDict[DomainKey, _Slot] = OrderedDict()  # LRU order: oldest first
        self._eviction: EvictionPolicy[DomainKey] = eviction_policy(eviction, slots)
        """Picks the victim among the resident (called with the bank lock held, like every bank change)."""
        self._merged: OrderedDict[int, None] = OrderedDict()  # slots whose merged weights are kept, LRU
        self._inflight: dict[DomainKey, Future[Fetched]] = {}
        self._staged: OrderedDict[DomainKey, Fetched] = OrderedDict()  # prefetched, not yet in the bank
        self._drops: dict[str, int] = {}
        self._pinned: Mapping[int, int] = pinned if pinned is not None else {}
        """Slot -> forwards running on it (the engine's, read with its bank lock held)."""
        self._retired: set[int] = set()
        """Slots of dropped versions still pinned by a running forward: cleared by `unpinned`."""

    # -- what is resident -------------------------------------------------------------------------
    def resident(self) -> list[DomainKey]:
        with self._lock:
            return list(self._resident)

    def manifest(self, key: DomainKey) -> DomainManifest | None:
        """The manifest of a resident version (None when it is not resident)."""
        with self._lock:
            slot = self._resident.get(key)
        return slot.manifest if slot is not None else None

    # -- reading artifacts ------------------------------------------------------------------------
    def fetch(self, key: DomainKey) -> Fetched:
        """Read one artifact from the store; concurrent callers for the same key share one read."""
        with self._lock:
            future = self._inflight.get(key)
            owner = future is None
            if owner:
                future = self._inflight[key] = Future()
            drops = self._drops.get(key.domain, 0)
        assert future is not None
        if not owner:
            return future.result()
        try:
            stored = self.store.get(key.domain, key.version)
            data = stored.read_tensor_bytes(verify=self.verify_checksums)
            fetched = Fetched(
                stored.manifest, adapter_config(stored.manifest.adapter), load_safetensors(data), drops
            )
            future.set_result(fetched)
            return fetched
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def _current(self, fetched: Fetched, key: DomainKey) -> bool:
        """The artifact was read after the domain's latest drop (call with the lock held)."""
        return fetched.drops == self._drops.get(key.domain, 0)

    def prefetch(self, key: DomainKey) -> None:
        """Read a non-resident version ahead of its batch (a no-op when resident or staged)."""
        with self._lock:
            if key in self._resident or key in self._staged:
                return
        fetched = self.fetch(key)
        with self._lock:
            if key not in self._resident and self._current(fetched, key):
                self._staged[key] = fetched
                while len(self._staged) > self.slots:  # bounded: forget the oldest
                    self._staged.popitem(last=False)

    # -- the bank (the engine's bank lock held) ----------------------------------------------------
    def ensure(self, keys: Sequence[DomainKey]) -> dict[DomainKey, int]:
        """Slots for `keys`, loading the misses."""
        wanted = set(keys)
        slots: dict[DomainKey, int] = {}
        for key, requests in Counter(keys).items():  # first-seen order
            self._eviction.record(key, requests)
            with self._lock:
                slot = self._resident.get(key)
                if slot is not None:
                    self._resident.move_to_end(key)
            if slot is not None:
                self.stats.hits += 1
                self.events.bank_hit(key)
                slots[key] = slot.index
                continue
            self.stats.misses += 1
            self.events.bank_miss(key)
            slots[key] = self.load(key, wanted)
        return slots

    def load(self, key: DomainKey, keep: set[DomainKey]) -> int:
        """Copy `key` into a free slot (evicting the eviction policy's victim, never one in `keep`)."""
        start = time.perf_counter()
        with self._lock:
            fetched: Fetched | None = self._staged.pop(key, None)
        for _ in range(2):  # a read overtaken by a drop is read again: from the store as it is now
            if fetched is None:
                fetched = self.fetch(key)
            with self._lock:
                if self._current(fetched, key):
                    break
            fetched = None
        if fetched is None:
            raise DomainUnavailable(f"{key.domain} v{key.version} was deleted while it was being loaded")
        with self._lock:
            index = self._free_slot(keep)
        try:
            self.net.bank_load(index, fetched.config, fetched.tensors)
        except (DomainMismatch, ValueError, KeyError) as exc:
            raise DomainUnavailable(
                f"{key.domain} v{key.version} cannot be loaded into the bank: {exc}"
            ) from exc
        with self._lock:
            self._resident[key] = _Slot(index, fetched.manifest)
            count = len(self._resident)
        seconds = time.perf_counter() - start
        self.stats.loads += 1
        self.stats.load_seconds.append(seconds)
        del self.stats.load_seconds[:-1000]
        self.events.bank_load(key, seconds)
        self.events.resident_changed(count)
        return index

    def _free_slot(self, keep: set[DomainKey]) -> int:
        """A free slot index, evicting the policy's victim among the versions not in `keep` (lock held)."""
        used = {s.index for s in self._resident.values()} | self._retired
        for i in range(self.slots):
            if i not in used:
                return i
        others = [key for key in self._resident if key not in keep]  # oldest use first
        candidates = [key for key in others if not self._pinned.get(self._resident[key].index)]
        if not candidates:
            if others or self._retired:  # a running forward holds them: free once it ends
                raise SlotsPinned("every slot a load could take is in use by a running forward")
            raise EngineError(f"a batch needs more than {self.slots} resident domains")
        key = self._eviction.victim(candidates)
        slot = self._resident.pop(key)
        self._merged.pop(slot.index, None)
        self.net.bank_clear(slot.index)
        self.stats.evictions += 1
        self.events.bank_evict(key)
        self.events.domain_dropped(key)
        return slot.index

    def drop(self, domain: str, version: int | None = None) -> int:
        """Drop a deleted domain's versions (all, or one) from the bank and the staged reads, and make
        reads begun before now stale; returns how many slots were freed."""
        with self._lock:
            self._drops[domain] = self._drops.get(domain, 0) + 1
            for key in [k for k in self._staged if k.domain == domain and version in (None, k.version)]:
                del self._staged[key]
            gone = [k for k in self._resident if k.domain == domain and version in (None, k.version)]
            for key in gone:
                slot = self._resident.pop(key)
                self._merged.pop(slot.index, None)
                if self._pinned.get(slot.index):  # a forward runs on it: cleared when it ends
                    self._retired.add(slot.index)
                else:
                    self.net.bank_clear(slot.index)
            count = len(self._resident)
        for key in gone:
            self.events.domain_dropped(key)
        if gone:
            self.events.resident_changed(count)
        return len(gone)

    def unpinned(self, slot: int) -> None:
        """The last forward on `slot` ended: clear it if its version was dropped meanwhile."""
        with self._lock:
            if slot in self._retired:
                self._retired.discard(slot)
                self.net.bank_clear(slot)

    def use_merged(self, slot: int) -> bool:
        """Whether a single-domain batch of `slot` runs on merged weights; keeps the `merged_cache` most
        recently used slots merged (the network folds on first use and drops a slot's on reload). A
        pinned slot keeps its merged weights until it is used again after its forwards (the cache can
        exceed its bound by the forwards running meanwhile)."""
        if self.merged_cache <= 0:
            return False
        with self._lock:
            if slot in self._merged:
                self._merged.move_to_end(slot)
            else:
                self._merged[slot] = None
            unpinned = [s for s in self._merged if s != slot and not self._pinned.get(s)]  # oldest first
            for old in unpinned[: max(0, len(self._merged) - self.merged_cache)]:
                del self._merged[old]
                self.net.unmerge(old)
        return True
