"""What the benchmarks share: a uvicorn server in a subprocess (`ServerProcess`, one process with its engine)
or the multi-process server (`SupervisorProcess`), process memory and CPU, stores of random domains.

    server = ServerProcess(store_dir, {"MD_BANK_SLOTS": "4"})
    server.wait_ready()            # or: await server.wait_ready_async()
    server.rss_bytes(), server.pss_bytes()
    server.stop()                  # SIGTERM, then SIGKILL after 30 s; server.kill() for SIGKILL at once

    connection = KeepAliveConnection("127.0.0.1", port)      # the load generators' lean client
    status = await connection.send(http_request("POST", "/v1/classify", {"X-Domain": "d0"}, body))

The server is started the way ``multidomain serve`` starts it (uvicorn on the app factory, settings from
``MD_*``), on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path

import httptools
import httpx
import numpy as np
import safetensors.torch
import torch
from PIL import Image

from adapters_store import (
    DomainManifest,
    LocalStore,
    Preprocessing,
    Provenance,
    manifest_to_json,
    sha256_hex,
    validate_backbone_artifact,
    validate_domain_artifact,
)
from model_artifacts import adapter_settings, backbone_artifact, spec_for
from residual_adapters import AdapterConfig, MultiDomainNet, create_backbone

ROOT = Path(__file__).resolve().parent.parent


# -- the load generators' client ----------------------------------------------------------------------
# Why not httpx here: on a 2-core machine the load generator's own CPU is taken from the server it
# measures, and httpx's per-request Python (request objects, header models, its connection pool) cost
# about 0.15 of a core at ~80 requests/s. Requests are built once as bytes, each client keeps its own
# connection, and responses are parsed by httptools (the C parser uvicorn itself runs on).
def http_request(method: str, path: str, headers: Mapping[str, str], body: bytes = b"") -> bytes:
    """One HTTP/1.1 keep-alive request as bytes, to be sent as often as wanted."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Response:
    """httptools' callbacks: status, keep-alive, body, and whether the message is complete (status and
    keep-alive are read when the headers are complete: the parser resets them once the message is)."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.keep_alive = False
        self.body = bytearray()
        self.complete = False

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


class KeepAliveConnection:
    """One client's HTTP/1.1 connection, opened on first use and again after the server closes it."""

    def __init__(self, host: str, port: int, timeout: float = 120.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """(status, body) of one request (`http_request`); raises OSError, TimeoutError or
        httptools.HttpParserError, after which the connection is closed (the next send opens another)."""
        try:
            async with asyncio.timeout(self.timeout):
                if self._writer is None:
                    self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
                assert self._reader is not None
                self._writer.write(request)
                response = _Response()
                while not response.complete:
                    data = await self._reader.read(65536)
                    if not data:
                        raise ConnectionResetError("the server closed the connection mid-response")
                    response.parser.feed_data(data)
        except BaseException:
            self.close()
            raise
        if not response.keep_alive:
            self.close()
        return response.status, bytes(response.body)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


# -- memory ---------------------------------------------------------------------------------------------
def _proc_field(path: str, name: str) -> int:
    """A ``name:   N kB`` line of a /proc file, in bytes (0 where unavailable: not Linux, process gone)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of process ``pid`` (this process when None)."""
    return _proc_field(f"/proc/{pid or 'self'}/status", "VmRSS")


def pss_bytes(pid: int | None = None) -> int:
    """Proportional set size: shared pages (torch's libraries) divided among the processes mapping them, so
    the PSS of several processes adds up to what they really use together."""
    return _proc_field(f"/proc/{pid or 'self'}/smaps_rollup", "Pss")


# -- the server process ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``uvicorn server.app:create_app --factory`` on 127.0.0.1 with ``MD_STORE_DIR=store_dir`` and ``env``."""

    def __init__(
        self,
        store_dir: Path,
        env: Mapping[str, str] | None = None,
        *,
        port: int | None = None,
        log_level: str = "warning",
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environ = {**os.environ, "MD_STORE_DIR": str(store_dir), **(env or {})}
        cmd = [sys.executable, "-m", "uvicorn", "server.app:create_app", "--factory", "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", log_level, "--no-access-log", "--backlog", "4096"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env=environ, cwd=ROOT)

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode}")

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # a benchmark may poll; tests never do
            self._check_alive()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server not ready in time")

    async def wait_ready_async(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2) as client:
            while time.monotonic() < deadline:
                self._check_alive()
                try:
                    if (await client.get(f"{self.url}/readyz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError("server not ready in time")

    def rss_bytes(self) -> int:
        return rss_bytes(self.proc.pid)

    def pss_bytes(self) -> int:
        return pss_bytes(self.proc.pid)

    def kill(self) -> None:
        """SIGKILL: no shutdown at all (what a crash looks like)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        """SIGTERM (uvicorn finishes what is in flight), SIGKILL if that takes more than 30 s."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class SupervisorProcess:
    """``python -m server.supervisor`` (what ``multidomain serve`` runs: K front ends, one engine per device)
    on a free 127.0.0.1 port, with ``MD_STORE_DIR=store_dir``, ``MD_WORKERS=workers`` and ``env``.

    Ready when every front end has reached every engine (read from the supervisor's ``md-event`` lines,
    not polled)."""

    def __init__(
        self, store_dir: Path, env: Mapping[str, str] | None = None, *, workers: int = 1, engines: int = 1
    ) -> None:
        environ = {
            **os.environ, "MD_STORE_DIR": str(store_dir), "MD_PORT": "0", "MD_WORKERS": str(workers),
            "MD_LOG_LEVEL": "warning", **(env or {}),
        }  # fmt: skip
        self.connections = workers * engines
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.supervisor"],
            env=environ,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.url = ""

    def wait_ready(self, timeout: float = 300) -> None:
        assert self.proc.stdout is not None
        connected, deadline = 0, time.monotonic() + timeout
        for line in self.proc.stdout:
            if line.startswith("md-event listening"):
                self.url = line.split("url=")[1].strip()
            elif line.startswith("md-event frontend-connected"):
                connected += 1
            if self.url and connected >= self.connections:
                # keep reading, or the children block on a full pipe
                threading.Thread(target=_drain, args=(self.proc.stdout,), daemon=True).start()
                return
            if time.monotonic() > deadline:
                break
        raise RuntimeError(f"server not ready (exit code {self.proc.poll()})")

    def processes(self) -> dict[int, str]:
        """Every process of the server (the supervisor first), pid -> kind."""
        return {pid: process_kind(pid) for pid in [self.proc.pid, *process_tree(self.proc.pid)]}

    def rss_bytes(self) -> int:
        return sum(rss_bytes(pid) for pid in self.processes())

    def pss_bytes(self) -> int:
        return sum(pss_bytes(pid) for pid in self.processes())

    def stop(self) -> None:
        """SIGTERM to the supervisor (it drains and stops its children), SIGKILL after 60 s."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _drain(stream: Iterable[str]) -> None:
    for _ in stream:
        pass


def process_tree(pid: int) -> list[int]:
    """All descendants of ``pid``."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(p) for p in f.read().split()]
    except OSError:
        return []
    return children + [g for c in children for g in process_tree(c)]


def process_kind(pid: int) -> str:
    """supervisor, engine, frontend, resource_tracker (multiprocessing's, one per front end) or other."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode()
    except OSError:
        return "gone"
    for kind in ("supervisor", "engine_process", "frontend_process", "resource_tracker"):
        if kind in cmd:
            return kind.removesuffix("_process")
    return "other"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- stores of random domains ---------------------------------------------------------------------------
def random_domain_artifact(
    net: MultiDomainNet,
    domain: str,
    *,
    seed: int,
    size: int,
    classes: int,
    adapter_scale: float = 0.02,
    head_scale: float = 0.02,
    fingerprint: str | None = None,
) -> tuple[bytes, bytes]:
    """(manifest bytes, tensor bytes) of a random parallel-adapter domain of ``net``, well scaled: BN
    scales and variances in [0.5, 1.5), adapters and BN shifts ``adapter_scale`` x N(0, 1), the head
    ``head_scale`` x N(0, 1) (small: spread, unsaturated probabilities). ``fingerprint``: ``net``'s, when
    the caller has it (hashing every weight per artifact adds up over hundreds of domains)."""
    cfg = AdapterConfig(kind="parallel")
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (shape, _) in net.domain_spec(cfg, classes).items():
        if name.endswith(("running_var", "bn.weight")):
            tensors[name] = torch.rand(shape, generator=g) + 0.5
        elif name.startswith("head."):
            tensors[name] = torch.randn(shape, generator=g) * head_scale
        else:
            tensors[name] = torch.randn(shape, generator=g) * adapter_scale
    data = safetensors.torch.save(tensors)
    manifest = DomainManifest(
        domain=domain,
        labels=[f"class_{k}" for k in range(classes)],
        backbone=str(net.architecture["name"]),
        backbone_fingerprint=fingerprint or net.fingerprint(),
        adapter=adapter_settings(cfg),
        preprocessing=Preprocessing(
            input_size=size, resize=size, mean=[0.5] * 3, std=[0.25] * 3, channels="rgb"
        ),
        provenance=Provenance(dataset="synthetic", epochs=0, created_at=datetime.now(UTC)),
        sha256=sha256_hex(data),
    )
    return manifest_to_json(manifest), data


def spread_domain_artifact(
    net: MultiDomainNet, domain: str, *, seed: int, size: int, classes: int, fingerprint: str | None = None
) -> tuple[bytes, bytes]:
    """A random domain whose probabilities are spread (mean top-1 about 0.7): with saturated one-hot
    answers two versions could give equal probabilities, and a check that recomputes answers offline
    could not tell them apart (chaos reports ``min_gap_between_versions``)."""
    return random_domain_artifact(
        net, domain, seed=seed, size=size, classes=classes, adapter_scale=0.05, head_scale=0.01,
        fingerprint=fingerprint,
    )  # fmt: skip


def add_domains(
    store: LocalStore, net: MultiDomainNet, size: int, indices: Iterable[int], classes: int, prefix: str = "d"
) -> int:
    """Put random domains ``{prefix}{i}`` (seed 1000 + i), validated against ``net``, each activated;
    returns one artifact's tensor bytes."""
    check = spec_for(net)
    fingerprint = net.fingerprint()
    nbytes = 0
    for i in indices:
        manifest, data = random_domain_artifact(
            net, f"{prefix}{i}", seed=1000 + i, size=size, classes=classes, fingerprint=fingerprint
        )
        nbytes = len(data)
        store.put(
            validate_domain_artifact(manifest, data, spec_for=check, fingerprint=fingerprint), activate=True
        )
    return nbytes


def build_store(
    root: Path, width: float, size: int, domains: int, classes: int, seed: int = 0
) -> MultiDomainNet:
    """A store with a random resnet26 backbone (seeded) and ``domains`` random domains d0..d{n-1}; returns
    the backbone's network (for recomputing answers offline)."""
    torch.manual_seed(seed)
    net = create_backbone("resnet26", width=width).eval()
    store = LocalStore(root)
    b_manifest, b_bytes = backbone_artifact(net)
    store.put_backbone(validate_backbone_artifact(manifest_to_json(b_manifest), b_bytes))
    add_domains(store, net, size, range(domains), classes)
    return net


# -- requests -------------------------------------------------------------------------------------------
def zipf_weights(n: int, s: float) -> list[float]:
    w = [1.0 / (k + 1) ** s for k in range(n)]
    total = sum(w)
    return [x / total for x in w]


def random_images(count: int, size: int, fmt: str = "PNG") -> list[bytes]:
    """``count`` random RGB images of ``size`` x ``size`` in PIL's ``fmt`` (seeded: the same images every
    run)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")
