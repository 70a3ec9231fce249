"""Which version serves each domain: the store's active versions, cached until the store changes.

    versions = ActiveVersions(store, poll_s=0.5)
    key, manifest = versions.resolve("birds")      # DomainKey("birds", 3) and its manifest

The one owner of the domain -> active version cache. It is forgotten when this process writes to the
store (`notice_store_change`) and when the store's revision (an opaque token: a counter locally, the
index's ETag on S3) changes, polled at most every `poll_s`: the one thing a replica watches to notice
changes made elsewhere. A key once resolved keeps its version to the end, so an answer never mixes
versions.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from adapters_store.manifest import DomainManifest
from adapters_store.store import AdapterStore


@dataclass(frozen=True, order=True)
class DomainKey:
    """One version of one domain: what a bank slot holds and what a request is served with."""

    domain: str
    version: int


class ActiveVersions:
    def __init__(self, store: AdapterStore, poll_s: float) -> None:
        self.store = store
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._active: dict[str, tuple[DomainKey, DomainManifest]] = {}
        self._revision = store.revision()
        self._checked = time.monotonic()

    def notice_store_change(self) -> None:
        """Forget every cached version (after this process wrote to the store)."""
        with self._lock:
            self._active.clear()
            self._revision = self.store.revision()
            self._checked = time.monotonic()

    def forget(self, domain: str) -> None:
        with self._lock:
            self._active.pop(domain, None)

    def _poll_due(self) -> bool:
        return time.monotonic() - self._checked >= self.poll_s

    def _poll(self) -> None:
        if not self._poll_due():
            return
        revision = self.store.revision()
        with self._lock:
            self._checked = time.monotonic()
            if revision != self._revision:  # another process (or replica's admin) changed the store
                self._revision = revision
                self._active.clear()

    def resolve(self, domain: str) -> tuple[DomainKey, DomainManifest]:
        """The active version's key and manifest; raises the store's DomainNotFound/VersionNotFound."""
        self._poll()
        with self._lock:
            cached = self._active.get(domain)
        if cached is not None:
            return cached
        stored = self.store.get(domain)
        entry = (DomainKey(domain, stored.version), stored.manifest)
        with self._lock:
            self._active[domain] = entry
        return entry

    def cached(self, domain: str) -> tuple[DomainKey, DomainManifest] | None:
        """What `resolve` would answer when that needs no store read (else None): for an event loop,
        which must not block on the store."""
        if self._poll_due():
            return None
        with self._lock:
            return self._active.get(domain)
