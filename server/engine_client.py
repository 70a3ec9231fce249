"""The front end's one object for talking to engines: `EngineClient` (async), over ZeroMQ or in-process.

Routes call only this: `resolve`, `lease` + `classify` (or `classify` of `EncodedJpegs`, which the engine
decodes), the domain operations and `metrics_texts`.
`RemoteEngines` (this module, no torch) reaches engine processes over ZeroMQ; `server.local_engine`
runs an engine in this process (tests, `create_app` without a supervisor) behind the same methods.

Several engines (one per device): each domain is served by one engine, picked by a stable hash of its
name (domain affinity, the same in every front end), so each engine's bank holds its share of the
domains. Store changes made through one engine are announced to the others at once.

Liveness: an engine binds its socket only once it is warm, and ZeroMQ reports the connection's handshake
and loss (a socket monitor). Until the handshake and the engine's `hello` answer, and from the moment
the connection drops (the engine died), requests fail at once with 503 `engine_unavailable`, requests in
flight on it included: nothing waits on a dead engine. ZeroMQ reconnects by itself when the supervisor
has restarted the engine on the same address.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from adapters_store.errors import DomainNotFound, VersionNotFound
from server.errors import EngineUnavailable, QueueFull, StaleVersion
from server.logs import current_request_id
from server.protocol import BadMessage, Message, affinity, announce, decode, encode
from server.shm import Lease, PixelSlab
from server.wire_errors import from_wire

log = logging.getLogger("server.engine_client")

_RESOLVE_CACHE = 4096
"""Most resolve answers a front end keeps (then it starts afresh)."""


class PixelLease:
    """Room for one request's uint8 crops [count, side, side, 3]; `release` when answered."""

    def __init__(self, array: np.ndarray, shared: Lease | None = None) -> None:
        self.array = array
        self.shared = shared

    def release(self) -> None:
        if self.shared is not None:
            self.shared.release()
            self.shared = None


@dataclass(frozen=True)
class EncodedJpegs:
    """A request's JPEGs as they came, for the engine to decode on its device (`MD_ENGINE_JPEG_DECODE`,
    `server.device_jpeg`): small next to their crops, so they travel in the message, not in a slab."""

    jpegs: list[bytes]

    def release(self) -> None:
        """Nothing held."""


class EngineClient(ABC):
    """What routes need from the engines; every method raises the server's or store's own errors."""

    count: int = 1

    def __init__(self) -> None:
        self._resolved: dict[tuple[str, int | None], Message] = {}
        """(domain, pinned version or None) -> the engine's resolve answer."""
        self._queue_state: dict[int, tuple[int, int]] = {}
        """engine -> (images queued, retry-after seconds) from its latest answer."""

    @abstractmethod
    def ready(self) -> bool:
        """Every engine is connected and warm."""

    @abstractmethod
    def info(self) -> dict[str, Any] | None:
        """The first engine's hello (backbone, fingerprint, device), None when not ready."""

    @abstractmethod
    async def refresh(self) -> None:
        """Bring `info` up to date (its resident count)."""

    @abstractmethod
    async def call(self, engine: int, op: str, **fields: Any) -> Message:
        """One request to one engine; its reply's values (errors raised)."""

    @abstractmethod
    def lease(self, count: int, side: int) -> PixelLease:
        """Room for a request's pixels (raises QueueFull when there is none)."""

    async def classify(
        self,
        resolved: Message,
        images: PixelLease | EncodedJpegs,
        top_k: int,
        *,
        check: bool = True,
        deadline_s: float | None = None,
    ) -> list[list[Any]]:
        """Per image [[index, label, probability], ...] from the engine serving the domain, with the
        version `resolved` names (from `resolve`); `check`: the engine refuses with `StaleVersion` when that
        is no longer the domain's active version (or, pinned, no longer stored as it was); the engine
        drops images still queued `deadline_s` seconds from now (DeadlineExceeded)."""
        domain = str(resolved["domain"])
        engine = self.engine_for(domain)
        try:
            reply = await self._classify(
                engine, domain, int(resolved["version"]), images, top_k,
                sha256=str(resolved["sha256"]) if check else None, pinned=bool(resolved["pinned"]),
                deadline_s=deadline_s,
            )  # fmt: skip
        except (StaleVersion, DomainNotFound, VersionNotFound):
            self.forget(domain)
            raise
        self._queue_state[engine] = (int(reply["queued"]), int(reply["retry_after"]))
        return list(reply["results"])

    @abstractmethod
    async def _classify(
        self, engine: int, domain: str, version: int, images: PixelLease | EncodedJpegs, top_k: int, *,
        sha256: str | None, pinned: bool, deadline_s: float | None = None,
    ) -> Message:  # fmt: skip
        """The engine's classify reply: `results`, the `version` served and its queue's state; the engine
        drops images still queued `deadline_s` seconds from now (DeadlineExceeded)."""

    @abstractmethod
    async def start(self) -> None:
        """Connect."""

    @abstractmethod
    async def close(self) -> None:
        """Disconnect and free what the client holds."""

    # -- routing ----------------------------------------------------------------------------------
    def engine_for(self, domain: str) -> int:
        return affinity(domain, self.count)

    async def resolve(self, domain: str, version: int | None = None, *, fresh: bool = False) -> Message:
        """The active version (or the pinned `version`) with its preprocessing, and the engine's queue
        state as of its latest answer. Cached per front end (`fresh`: ask the engine): the engine checks
        a cached answer when the request is classified (`StaleVersion`), so the cache saves a round trip
        per request and is never trusted for which version serves."""
        engine = self.engine_for(domain)
        cached = None if fresh else self._resolved.get((domain, version))
        if cached is None:
            cached = await self.call(engine, "resolve", domain=domain, version=version)
            if len(self._resolved) >= _RESOLVE_CACHE:
                self._resolved.clear()  # bounded: a flood of pinned versions cannot grow it
            self._resolved[(domain, version)] = cached
            self._queue_state[engine] = (int(cached["queued"]), int(cached["retry_after"]))
        queued, retry_after = self._queue_state.get(engine, (0, 1))
        return {**cached, "queued": queued, "retry_after": retry_after}

    def forget(self, domain: str) -> None:
        """Drop the domain's cached resolves (after a change through this front end, or an error)."""
        for key in [k for k in self._resolved if k[0] == domain]:
            self._resolved.pop(key, None)

    async def upload(
        self, domain: str, manifest: bytes, tensors: bytes, filename: str | None, activate: bool
    ) -> int:
        reply = await self.call(
            self.engine_for(domain), "upload", domain=domain, manifest=manifest, tensors=tensors,
            filename=filename, activate=activate,
        )  # fmt: skip
        self.forget(domain)
        await self._announce(domain, None, evict=False)
        return int(reply["version"])

    async def activate(self, domain: str, version: int | None) -> int:
        reply = await self.call(self.engine_for(domain), "activate", domain=domain, version=version)
        self.forget(domain)
        await self._announce(domain, None, evict=False)
        return int(reply["version"])

    async def delete(self, domain: str, version: int | None) -> None:
        try:
            await self.call(self.engine_for(domain), "delete", domain=domain, version=version)
        finally:
            self.forget(domain)
        await self._announce(domain, version, evict=True)

    async def _announce(self, domain: str, version: int | None, evict: bool) -> None:
        owner = self.engine_for(domain)
        others = [i for i in range(self.count) if i != owner]
        await asyncio.gather(
            *(self.call(i, "store_changed", domain=domain, version=version, evict=evict) for i in others)
        )

    async def listing(self) -> list[dict[str, Any]]:
        replies = await asyncio.gather(*(self.call(i, "listing") for i in range(self.count)))
        merged = replies[0]["domains"]
        for reply in replies[1:]:  # the store is shared; residency is per engine
            resident = {d["domain"] for d in reply["domains"] if d["resident"]}
            for d in merged:
                d["resident"] = d["resident"] or d["domain"] in resident
        return list(merged)

    async def describe(self, domain: str, version: int | None = None) -> dict[str, Any]:
        """The domain's versions, residency on every engine and the manifest of `version` (default active)."""
        replies = await asyncio.gather(
            *(self.call(i, "describe", domain=domain, version=version) for i in range(self.count))
        )
        detail = dict(replies[0]["domain"])
        detail["resident_versions"] = sorted({v for r in replies for v in r["domain"]["resident_versions"]})
        return detail

    async def metrics_texts(self) -> tuple[list[bytes], set[str] | None]:
        """Each ready engine's own Prometheus text (an engine that is down contributes nothing), and the
        store's domains as an engine lists them (None when no engine answered): series of any other
        domain (deleted) are left out of /metrics."""
        out, domains = [], None
        for i in range(self.count):
            try:
                reply = await self.call(i, "metrics")
            except EngineUnavailable:
                out.append(b"")
                continue
            out.append(bytes(reply["text"]))
            domains = {str(d) for d in reply.get("domains", [])}
        return out, domains


class _Connection:
    """One engine's DEALER socket, its pending requests and its state."""

    def __init__(self, index: int, endpoint: str, context: zmq.asyncio.Context) -> None:
        self.index = index
        self.endpoint = endpoint
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.IMMEDIATE, 1)  # send fails at once while no engine is connected
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RECONNECT_IVL, 50)
        self.socket.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        self.monitor = self.socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self.socket.connect(endpoint)
        self.pending: dict[int, asyncio.Future[Message]] = {}
        self.hello: dict[str, Any] | None = None
        self.generation = 0
        """Counts connections: a hello answered for an older connection is ignored."""

    def fail_pending(self, reason: str) -> None:
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(EngineUnavailable(reason))


class RemoteEngines(EngineClient):
    def __init__(
        self, endpoints: list[str], slab: PixelSlab, *, timeout_s: float = 120.0, name: str = "frontend"
    ) -> None:
        super().__init__()
        self.endpoints = endpoints
        self.count = len(endpoints)
        self.slab = slab
        self.timeout_s = timeout_s
        self.name = name
        self._context = zmq.asyncio.Context()
        self._connections: list[_Connection] = []
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._connections = [_Connection(i, e, self._context) for i, e in enumerate(self.endpoints)]
        for c in self._connections:
            self._tasks.append(asyncio.create_task(self._receive(c)))
            self._tasks.append(asyncio.create_task(self._watch(c)))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for c in self._connections:
            c.fail_pending("the front end is shutting down")
            c.socket.disable_monitor()
            c.monitor.close(0)
            c.socket.close(0)
        self._context.term()
        self.slab.close()

    def ready(self) -> bool:
        return bool(self._connections) and all(c.hello is not None for c in self._connections)

    def info(self) -> dict[str, Any] | None:
        if not self.ready():
            return None
        hello = dict(self._connections[0].hello or {})
        hello["resident_domains"] = sum(
            int((c.hello or {}).get("resident_domains", 0)) for c in self._connections
        )
        return hello

    async def refresh(self) -> None:
        for c in self._connections:
            if c.hello is not None:
                hello = await self._send(c, "hello", {})
                if c.hello is not None:  # not dropped meanwhile
                    c.hello = hello

    # -- the sockets ------------------------------------------------------------------------------
    async def _receive(self, c: _Connection) -> None:
        while True:
            frames = await c.socket.recv_multipart(copy=True)
            try:
                reply = decode(frames[-1])
            except BadMessage as exc:
                log.error("engine %d sent a bad message: %s", c.index, exc)
                continue
            future = c.pending.pop(int(reply.get("id", -1)), None)
            if future is not None and not future.done():
                future.set_result(reply)

    async def _watch(self, c: _Connection) -> None:
        while True:
            event = parse_monitor_message(await c.monitor.recv_multipart())
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                c.generation += 1
                self._tasks.append(asyncio.create_task(self._greet(c, c.generation)))
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                c.hello = None
                c.fail_pending(f"engine {c.index} went away (it is being restarted)")
                log.warning("engine %d disconnected", c.index)

    async def _greet(self, c: _Connection, generation: int) -> None:
        try:
            reply = await self._send(c, "hello", {})
        except EngineUnavailable:
            return
        if generation == c.generation:
            c.hello = reply
            announce(f"frontend-connected name={self.name} engine={c.index}")

    async def _send(self, c: _Connection, op: str, fields: dict[str, Any]) -> Message:
        request_id = next(self._ids)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        c.pending[request_id] = future
        try:
            # The HTTP request's ID travels with every message, so the engine's log lines carry it too.
            message = {"op": op, "id": request_id, "request_id": current_request_id(), **fields}
            await c.socket.send(encode(message), flags=zmq.NOBLOCK)
        except zmq.Again:
            c.pending.pop(request_id, None)
            raise EngineUnavailable(f"engine {c.index} is not connected (starting or restarting)") from None
        try:
            reply = await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            c.pending.pop(request_id, None)
            raise EngineUnavailable(f"engine {c.index} did not answer within {self.timeout_s} s") from None
        if not reply.get("ok"):
            raise from_wire(reply.get("error") or {})
        return reply

    async def call(self, engine: int, op: str, **fields: Any) -> Message:
        c = self._connections[engine]
        if c.hello is None:
            raise EngineUnavailable(f"engine {engine} is not ready (starting or restarting)")
        return await self._send(c, op, fields)

    # -- pixels -----------------------------------------------------------------------------------
    def lease(self, count: int, side: int) -> PixelLease:
        shared = self.slab.lease(count, side)
        if shared is None:
            raise QueueFull(
                f"this front end's pixel slab ({self.slab.size} bytes) has no room for {count} images of "
                f"{side}x{side}: too many images in flight"
            )
        return PixelLease(shared.array, shared)

    async def _classify(
        self, engine: int, domain: str, version: int, images: PixelLease | EncodedJpegs, top_k: int, *,
        sha256: str | None, pinned: bool, deadline_s: float | None = None,
    ) -> Message:  # fmt: skip
        where: dict[str, Any]
        if isinstance(images, EncodedJpegs):
            where = {"jpegs": images.jpegs}
        else:
            assert images.shared is not None
            where = {"slab": self.slab.name, "offset": images.shared.offset, "count": len(images.array),
                     "side": images.array.shape[1]}  # fmt: skip
        return await self.call(
            engine, "classify", domain=domain, version=version, top_k=top_k, sha256=sha256, pinned=pinned,
            deadline_s=deadline_s, **where,
        )  # fmt: skip
