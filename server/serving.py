"""Running the app under uvicorn: in the foreground (the CLI) or in a background thread (tests, benchmarks).

`uvicorn_config(app)` is how every server here runs an app: with the guarded HTTP protocol
(`server.http_protocol`: read deadlines, connection limits, trusted proxies), no WebSocket support (the
API has none) and uvicorn's own proxy-header rewriting off (`MD_TRUSTED_PROXIES` decides instead:
uvicorn's default would believe `X-Forwarded-For` from any client on 127.0.0.1).

`ServerThread` binds its loopback socket before uvicorn starts, so clients can connect at once: their
connections wait in the listen backlog until the app has loaded and warmed up (no polling needed).
"""

from __future__ import annotations

import socket
import threading
from types import TracebackType
from typing import Any

import uvicorn
from fastapi import FastAPI

from server.connection_limits import ConnectionGuard
from server.http_protocol import protocol_class


def uvicorn_config(app: FastAPI, **options: Any) -> uvicorn.Config:
    """uvicorn's configuration for `app` (made by `server.app.create_app`); `options` are uvicorn's."""
    guard: ConnectionGuard = app.state.connection_guard
    return uvicorn.Config(
        app, http=protocol_class(guard), ws="none", proxy_headers=False, lifespan="on", **options
    )


class ServerThread:
    def __init__(
        self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
    ) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(2048)
        self.host, self.port = self._sock.getsockname()[:2]
        config = uvicorn_config(app, log_level=log_level, access_log=False, backlog=2048)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=60)
        self._sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
