"""One engine process: `python -m server.engine_process --index I --device D --endpoint ipc://...`.

Started by the supervisor, one per device. It loads the backbone and warms up (measuring its micro-batch)
*before* binding its ZeroMQ ROUTER socket, so a front end that is connected talks to a warm engine. It
answers the front ends' messages (`server.protocol`) by calling `EngineService`; pixels are read in
place from the front ends' shared-memory slabs. Slow or blocking operations (store reads, uploads,
metrics) run in a small thread pool; the event loop only routes messages and awaits the batcher.

SIGTERM drains: new classify requests get 503 `engine_unavailable`, the ones admitted are answered,
then the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zmq
import zmq.asyncio
from prometheus_client import disable_created_metrics

from server.engine_service import EngineService, prediction_values
from server.errors import EngineUnavailable
from server.logs import configure_logging, set_request_id
from server.protocol import BadMessage, Message, announce, decode, encode, failure, ok
from server.settings import Settings
from server.shm import SlabReader
from server.wire_errors import to_wire

log = logging.getLogger("server.engine_process")


class EngineProcess:
    def __init__(self, service: EngineService, endpoint: str, index: int) -> None:
        self.service = service
        self.endpoint = endpoint
        self.index = index
        self.slabs = SlabReader()
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="engine-ops")
        self.draining = False
        self._handlers: set[asyncio.Task[None]] = set()
        s = service
        self._blocking: dict[str, Callable[..., Any]] = {
            "resolve": s.resolve,
            "upload": lambda **f: {"version": s.upload(**f)},
            "activate": lambda **f: {"version": s.activate(**f)},
            "delete": s.delete,
            "store_changed": s.store_changed,
            "listing": lambda: {"domains": s.listing()},
            "describe": lambda domain, version=None: {"domain": s.describe(domain, version)},
            "metrics": lambda: {"text": s.metrics_text(), "domains": s.store.list_domains()},
        }

    async def serve(self) -> None:
        context = zmq.asyncio.Context()
        socket = context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        if self.endpoint.startswith("ipc://"):  # a stale socket file from a killed predecessor
            Path(self.endpoint.removeprefix("ipc://")).unlink(missing_ok=True)
        socket.bind(self.endpoint)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        announce(f"engine-ready index={self.index} pid={os.getpid()}")
        receiving = asyncio.create_task(self._receive(socket))
        await stop.wait()
        self.draining = True
        if self._handlers:
            await asyncio.wait(list(self._handlers))  # answer what was admitted
        receiving.cancel()
        socket.close(0)
        context.term()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.service.close()
        self.slabs.close()

    async def _receive(self, socket: zmq.asyncio.Socket) -> None:
        while True:
            frames = await socket.recv_multipart()
            identity, payload = frames[0], frames[-1]
            task = asyncio.create_task(self._answer(socket, identity, payload))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _answer(self, socket: zmq.asyncio.Socket, identity: bytes, payload: bytes) -> None:
        request_id: object = None
        try:
            message = decode(payload)
            request_id = message.get("id")
            http_id = message.get("request_id")  # this task's log lines name the HTTP request
            set_request_id(http_id if isinstance(http_id, str) else None)
            reply = await self._handle(message)
        except BadMessage as exc:
            log.warning("refused a message: %s", exc)
            reply = failure("BadRequest", str(exc))
        except Exception as exc:
            reply = to_wire(exc)
        reply["id"] = request_id
        await socket.send_multipart([identity, encode(reply)])

    async def _handle(self, message: Message) -> Message:
        op = message.get("op")
        fields = {k: v for k, v in message.items() if k not in ("op", "id", "request_id")}
        if op == "hello":
            return ok(**self.service.info())
        if op == "classify":
            return await self._classify(**fields)
        if not isinstance(op, str) or op not in self._blocking:
            return failure("BadRequest", f"unknown operation {op!r}")
        if self.draining and op != "metrics":
            raise EngineUnavailable("the engine is shutting down")
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()  # the request ID, for the worker thread's log lines
        result = await loop.run_in_executor(self.pool, lambda: context.run(self._blocking[op], **fields))
        return ok(**(result or {}))

    async def _classify(
        self,
        domain: str,
        version: int,
        top_k: int,
        slab: str = "",
        offset: int = 0,
        count: int = 0,
        side: int = 0,
        jpegs: list[bytes] | None = None,
        sha256: str | None = None,
        pinned: bool = False,
        deadline_s: float | None = None,
    ) -> Message:
        """Queue a request's crops (in a front end's slab, or `jpegs` to decode here) and answer them."""
        if self.draining:
            raise EngineUnavailable("the engine is shutting down")
        service = self.service
        # The check of the front end's cached resolve runs here on the event loop when the engine's own
        # cache answers it (the common case: no thread hop per request), else in the pool.
        key = service.serving_key(domain, version, sha256, pinned, may_block=False)
        if key is None:
            loop = asyncio.get_running_loop()
            check = functools.partial(service.serving_key, domain, version, sha256, pinned)
            key = await loop.run_in_executor(self.pool, contextvars.copy_context().run, check)
        assert key is not None
        pixels: np.ndarray | torch.Tensor
        if jpegs is None:
            pixels = self.slabs.view(slab, offset, count, side)
        else:
            pixels = await asyncio.wrap_future(service.decode_jpegs(domain, version, jpegs))
        futures = service.submit(domain, version, pixels, top_k, deadline_s)
        predictions = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        log.debug("classified %d images in %s version %d", len(pixels), domain, version)
        return ok(
            results=[prediction_values(p) for p in predictions], version=version, **service.queue_state()
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--engines", type=int, default=1, help="how many engines serve (domain affinity)")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    settings = Settings()
    configure_logging(f"engine-{args.index}", args.log_level, json_lines=settings.log_json)
    # Counters' `_created` samples would come out of the front ends' merge as separate gauge families.
    disable_created_metrics()
    service = EngineService(settings, device=args.device, engine=(args.index, args.engines))
    asyncio.run(EngineProcess(service, args.endpoint, args.index).serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
