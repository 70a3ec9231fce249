"""The supervisor: `multidomain serve` runs it, and it runs K front ends and one engine per device.

    supervisor (this process: no torch, binds the port, restarts children, forwards SIGTERM)
      ├── engine 0 (torch, device 0)  ROUTER ipc://RUN/engine-0.sock
      ├── engine 1 ...                ROUTER ipc://RUN/engine-1.sock
      ├── front end 0 (no torch)  uvicorn on its own SO_REUSEPORT socket, DEALER to every engine
      └── front end 1 ...

Children die with it (PR_SET_PDEATHSIG: SIGTERM when the supervisor goes, SIGKILL included). A child that
exits is restarted (an engine on the same address, where the front ends reconnect by themselves); more
than `_MAX_RESTARTS` within five minutes stops the server with an error instead of looping. SIGTERM (or
SIGINT) drains: front ends first (they finish the requests in flight), then engines. As PID 1 in a
container it also reaps orphans. It prints one `md-event` line per state change on stdout, so tests and
operators can follow start-up and restarts without polling.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import multiprocess

from server.logs import configure_logging
from server.protocol import announce
from server.settings import Settings

log = logging.getLogger("server.supervisor")

_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}
_MAX_RESTARTS = 5
_RESTART_WINDOW_S = 300.0
_STOP_TIMEOUT_S = 40.0
_PR_SET_PDEATHSIG = 1


def _as_child() -> None:
    """Runs in each child between fork and exec: default signal mask, and die with the supervisor."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    kind: str
    """engine or frontend"""
    index: int
    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    restarts: deque[float] = field(default_factory=deque)

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, env=self.env, preexec_fn=_as_child, close_fds=True)
        announce(f"started kind={self.kind} index={self.index} pid={self.process.pid}")

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else -1


class Supervisor:
    def __init__(self, settings: Settings, log_level: str = "info") -> None:
        self.settings = settings
        self.log_level = log_level
        self.run_dir = Path(tempfile.mkdtemp(prefix="multidomain-"))
        self.metrics_dir = self.run_dir / "metrics"
        self.metrics_dir.mkdir()
        # Holds the port (bound, never listening, so it is never handed a connection): each front end
        # binds its own listening socket to it with SO_REUSEPORT and the kernel spreads new connections
        # over them by hash. One shared listening socket instead lets whichever process is in accept()
        # first take a whole burst of keep-alive connections (measured: 32 of 32 on one of two).
        self.port_holder = reuseport_socket(settings.host, settings.port)
        self.host, self.port = self.port_holder.getsockname()[:2]
        self.children: list[Child] = []

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {"MD_HOST": self.host, "MD_PORT": str(self.port), "MD_STORE_DIR": str(self.settings.store_dir)}
        )
        # torch's OpenMP threads sleep rather than spin (see server/__init__.py) unless told otherwise.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.pop("MD_ENGINE_ENDPOINTS", None)
        return env

    def plan(self) -> list[Child]:
        devices = self.settings.device_list()
        endpoints = [f"ipc://{self.run_dir}/engine-{i}.sock" for i in range(len(devices))]
        base = self._environment()
        python = sys.executable
        children = [
            Child(
                "engine",
                i,
                [
                    python,
                    "-m",
                    "server.engine_process",
                    "--index",
                    str(i),
                    "--device",
                    device,
                    "--engines",
                    str(len(devices)),
                    "--endpoint",
                    endpoints[i],
                    "--log-level",
                    self.log_level,
                ],
                base,
            )
            for i, device in enumerate(devices)
        ]
        frontend_env = {
            **base,
            "MD_ENGINE_ENDPOINTS": ",".join(endpoints),
            "MD_WORKERS": str(self.settings.frontends()),
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
        }
        children += [
            Child(
                "frontend",
                i,
                [python, "-m", "server.frontend_process", "--log-level", self.log_level],
                frontend_env,
            )
            for i in range(self.settings.frontends())
        ]
        return children

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        self.children = self.plan()
        try:
            for child in self.children:
                child.start()
            announce(f"listening url=http://{self.host}:{self.port}")
            status = self._watch()
        finally:
            self._stop()
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return status

    def _watch(self) -> int:
        while True:
            info = signal.sigtimedwait(list(_SIGNALS), 1.0)
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                announce("stopping")
                return 0
            for child, code in self._reap():
                announce(f"exited kind={child.kind} index={child.index} pid={child.pid} code={code}")
                if child.kind == "frontend":
                    multiprocess.mark_process_dead(child.pid, str(self.metrics_dir))
                now = time.monotonic()
                child.restarts.append(now)
                while child.restarts and now - child.restarts[0] > _RESTART_WINDOW_S:
                    child.restarts.popleft()
                if len(child.restarts) > _MAX_RESTARTS:
                    log.error(
                        "%s %d exited %d times within %.0f s: stopping",
                        child.kind,
                        child.index,
                        _MAX_RESTARTS,
                        _RESTART_WINDOW_S,
                    )
                    return 1
                child.start()

    def _reap(self) -> list[tuple[Child, int]]:
        """Every exited process: our children (with their exit codes) and, as PID 1, orphans."""
        by_pid = {c.pid: c for c in self.children}
        exited = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            child = by_pid.get(pid)
            if child is not None and child.process is not None:
                code = os.waitstatus_to_exitcode(status)
                child.process.returncode = code
                exited.append((child, code))
        return exited

    def _stop(self) -> None:
        for kind in ("frontend", "engine"):  # front ends drain first, while the engines still answer
            group = [
                c for c in self.children if c.kind == kind and c.process and c.process.returncode is None
            ]
            for child in group:
                assert child.process is not None
                child.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + _STOP_TIMEOUT_S
            for child in group:
                assert child.process is not None
                try:
                    child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait()
        self.port_holder.close()


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT (the supervisor's and each front end's)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def run_server(settings: Settings, log_level: str = "info") -> int:
    """Run the server until SIGTERM/SIGINT; the exit status."""
    return Supervisor(settings, log_level).run()


def main() -> int:
    settings = Settings()
    configure_logging("supervisor", "info", json_lines=settings.log_json)
    return run_server(settings, os.environ.get("MD_LOG_LEVEL", "info"))


if __name__ == "__main__":
    sys.exit(main())
