"""One front-end process: `python -m server.frontend_process` (started by the supervisor).

It listens on MD_HOST:MD_PORT with SO_REUSEPORT, like every other front end (the kernel spreads new
connections over them), before the app starts: connections wait in the backlog until it is up. The
engines' addresses are in `MD_ENGINE_ENDPOINTS`. uvicorn handles SIGTERM by finishing the requests in
flight.
"""

from __future__ import annotations

import argparse
import os
import sys

import uvicorn

from server.app import create_app
from server.logs import configure_logging
from server.settings import Settings
from server.supervisor import reuseport_socket


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    settings = Settings()
    if not settings.engine_endpoints:
        parser.error("MD_ENGINE_ENDPOINTS is not set: front ends are started by the supervisor")
    configure_logging(f"frontend-{os.getpid()}", args.log_level, json_lines=settings.log_json)
    listening = reuseport_socket(settings.host, settings.port)
    listening.listen(2048)
    # log_config=None: uvicorn's loggers go through this process's handler (request IDs, JSON lines).
    config = uvicorn.Config(
        create_app(settings), log_level=args.log_level, access_log=False, lifespan="on", log_config=None,
        timeout_graceful_shutdown=30,
    )  # fmt: skip
    uvicorn.Server(config).run(sockets=[listening])
    return 0


if __name__ == "__main__":
    sys.exit(main())
