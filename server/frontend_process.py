"""One front-end process: `python -m server.frontend_process --fd N` (started by the supervisor).

It serves the app on the listening socket the supervisor bound and passed down (file descriptor N, shared
by every front end: the kernel spreads connections over them), with the engines' addresses in
`MD_ENGINE_ENDPOINTS`. uvicorn handles SIGTERM by finishing the requests in flight.
"""

from __future__ import annotations

import argparse
import socket
import sys

import uvicorn

from server.app import create_app
from server.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--fd", type=int, required=True, help="the inherited listening socket")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    settings = Settings()
    if not settings.engine_endpoints:
        parser.error("MD_ENGINE_ENDPOINTS is not set: front ends are started by the supervisor")
    listening = socket.socket(fileno=args.fd)
    config = uvicorn.Config(
        create_app(settings), log_level=args.log_level, access_log=False, lifespan="on",
        timeout_graceful_shutdown=30,
    )  # fmt: skip
    uvicorn.Server(config).run(sockets=[listening])
    return 0


if __name__ == "__main__":
    sys.exit(main())
