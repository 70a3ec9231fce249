"""One front-end process: `python -m server.frontend_process` (started by the supervisor).

It listens on MD_HOST:MD_PORT with SO_REUSEPORT, like every other front end (the kernel spreads new
connections over them), before the app starts: connections wait in the backlog until it is up. The
engines' addresses are in `MD_ENGINE_ENDPOINTS`. uvicorn handles SIGTERM by finishing the requests in
flight.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import resource
import sys

import uvicorn

from server.app import create_app
from server.connection_limits import ConnectionLimits
from server.logs import configure_logging
from server.serving import uvicorn_config
from server.settings import Settings
from server.supervisor import reuseport_socket

_YOUNG_COLLECTION_THRESHOLD = 10_000
"""Net container allocations between two young collections (Python's default: 700)."""

_SPARE_FILES = 256
"""File descriptors beside client connections (engine sockets, shared memory, logs, the store)."""


def _allow_connections(connections: int) -> None:
    """Raise the soft open-file limit (often 1024) towards the hard one, so this front end's share of
    MD_MAX_CONNECTIONS is refused by the server with a 503 instead of by accept() with EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + _SPARE_FILES
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def _yield_to_engine() -> None:
    """SCHED_BATCH for this process's threads (the policy is per thread on Linux: those already started
    too) and the threads they start (`MD_FRONTEND_SCHED_BATCH`); needs no privilege. A real-time policy
    (an operator's `chrt`) is the operator's choice and is kept."""
    if not sys.platform.startswith("linux") or os.sched_getscheduler(0) != os.SCHED_OTHER:
        return
    try:
        for tid in os.listdir("/proc/self/task"):
            os.sched_setscheduler(int(tid), os.SCHED_BATCH, os.sched_param(0))
    except OSError as exc:  # a sandbox without the syscall: run as before rather than fail
        logging.getLogger(__name__).warning("front end keeps SCHED_OTHER (%s)", exc)


def _quiet_garbage_collector() -> None:
    """Keep the cyclic garbage collector off the request path, once the modules are imported.

    A request's objects are freed by reference counting (it leaves no cycles, as
    tests/server/test_lifetime.py checks), so the collector only re-traversed live objects: about 8% of a
    front end's CPU under the bench's load, in full collections over the ~80,000 objects of FastAPI,
    pydantic and the routes (~60 ms each) and young ones every ~10 requests over the ~2,000 objects of
    the requests in flight.
    Frozen, the imported objects are never traversed again; a real build-up of cycles still crosses the
    higher young threshold and is collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(_YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    settings = Settings()
    if not settings.engine_endpoints:
        parser.error("MD_ENGINE_ENDPOINTS is not set: front ends are started by the supervisor")
    configure_logging(f"frontend-{os.getpid()}", args.log_level, json_lines=settings.log_json)
    if settings.frontend_sched_batch:
        _yield_to_engine()  # before the app's threads start: they inherit the policy
    _allow_connections(ConnectionLimits.for_frontend(settings).max_connections)
    listening = reuseport_socket(settings.host, settings.port)
    listening.listen(2048)
    # log_config=None: uvicorn's loggers go through this process's handler (request IDs, JSON lines).
    config = uvicorn_config(
        create_app(settings), log_level=args.log_level, access_log=False, log_config=None,
        timeout_graceful_shutdown=30,
    )  # fmt: skip
    _quiet_garbage_collector()
    uvicorn.Server(config).run(sockets=[listening])
    return 0


if __name__ == "__main__":
    sys.exit(main())
