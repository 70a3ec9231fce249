"""A multidomain cluster on one machine, without Docker: N replicas and HAProxy as loopback processes.

The same shape as `docker-compose.cluster.yml`: every replica runs `multidomain serve` on its own port over
one shared store (S3, or a local directory; the replicas notice each other's changes through its revision),
and HAProxy (`deploy/haproxy/haproxy.cfg`) routes each domain to one replica by consistent hashing with
bounded load, terminating TLS with a self-signed certificate made at start-up.

    python deploy/cluster.py --store ./store        # what `make cluster` runs; Ctrl-C stops everything

Every process listens on 127.0.0.1, runs in its own process group (a replica may be a supervisor with
children) and is stopped through that group's id, which is its PID. `Cluster` is also what the cluster
tests and `bench/cluster.py` start.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
REPLICAS = 3
"""Replicas the shipped HAProxy configuration names (r1..r3)."""


class ClusterError(RuntimeError):
    """A process of the cluster did not start or become ready."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def self_signed_certificate(directory: Path, host: str = "127.0.0.1") -> Path:
    """A PEM file with a fresh self-signed certificate for `host` followed by its key (HAProxy's `crt`).

    The openssl command line rather than a Python library: it ships with every Debian base, and the
    project does not otherwise need a crypto package."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key, pem = directory / "lb-cert.pem", directory / "lb-key.pem", directory / "lb.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={host}",
         "-addext", f"subjectAltName=IP:{host}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    pem.chmod(0o600)
    return pem


class GroupProcess:
    """A child in its own process group, so stopping it also stops whatever it started."""

    def __init__(self, name: str, command: Sequence[str], env: Mapping[str, str], log: Path) -> None:
        self.name = name
        self.log_path = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                list(command), env=dict(env), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.pid = self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole group at once: no drain, no goodbye (a crash)."""
        self._signal_group(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (graceful drain), then SIGKILL after `timeout`."""
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        self._signal_group(signal.SIGKILL)  # children a supervisor may have left
        self.proc.wait()

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):  # the whole group has exited already
            os.killpg(self.pid, sig)  # the group id is the child's PID (start_new_session)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class ClusterConfig:
    store: str | Path
    """The store every replica shares: s3://bucket/prefix (endpoint and keys from the AWS_* settings in
    this process's environment or `replica_env`), or a directory (several processes on one host are safe
    on it)."""
    work_dir: Path
    """Certificate and process logs."""
    host: str = "127.0.0.1"
    lb_source: str = "127.0.0.9"
    """The address HAProxy connects to the replicas from, and the one proxy they trust for X-Forwarded-For
    (MD_TRUSTED_PROXIES): on loopback another address than the clients' 127.0.0.1, so that a client
    connecting to a replica directly cannot name another client."""
    replica_ports: list[int] = field(default_factory=list)
    """One per replica; empty: free ports."""
    lb_port: int = 0
    lb_tls_port: int = 0
    stats_port: int = 0
    """0: a free port."""
    inference_backend: str = "affine"
    """HAProxy backend for inference: "affine" (consistent hash on the domain) or "roundrobin"."""
    balance_factor: int = 200
    """HAProxy's hash-balance-factor (%): the shipped default (deploy/haproxy/haproxy.cfg says why)."""
    lb_log_level: str = "warning"
    """HAProxy's log level on its stderr (haproxy.log in `work_dir`): "info" logs every request (httplog)."""
    replica_env: dict[str, str] = field(default_factory=dict)
    """MD_* settings for every replica (bank slots, tokens, ...), over those of this process's environment."""
    bootstrap: bool = True
    """Let a replica import MobileNetV2 into an empty store (the first-run default of `multidomain serve`)."""


class Cluster:
    """Replicas + HAProxy, started in that order and stopped in reverse, all by PID."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        c = config
        self.replica_ports = list(c.replica_ports) or [free_port(c.host) for _ in range(REPLICAS)]
        if len(self.replica_ports) != REPLICAS:
            raise ClusterError(
                f"the HAProxy configuration names {REPLICAS} replicas, not {len(self.replica_ports)}"
            )
        self.lb_port = c.lb_port or free_port(c.host)
        self.lb_tls_port = c.lb_tls_port or free_port(c.host)
        self.stats_port = c.stats_port or free_port(c.host)
        self.replicas: list[GroupProcess | None] = [None] * REPLICAS
        self.haproxy: GroupProcess | None = None
        self.certificate: Path | None = None

    # -- addresses ----------------------------------------------------------------------------------
    @property
    def lb_url(self) -> str:
        return f"http://{self.config.host}:{self.lb_port}"

    @property
    def lb_tls_url(self) -> str:
        return f"https://{self.config.host}:{self.lb_tls_port}"

    def replica_url(self, index: int) -> str:
        return f"http://{self.config.host}:{self.replica_ports[index]}"

    @staticmethod
    def server_name(index: int) -> str:
        """The replica's name in the HAProxy configuration (and in its X-Served-By header)."""
        return f"r{index + 1}"

    # -- processes ----------------------------------------------------------------------------------
    def replica_environment(self, index: int) -> dict[str, str]:
        """This process's environment (MD_* settings such as MD_ADMIN_TOKEN reach every replica), with the
        replica's own address and the shared store, then `replica_env`."""
        env = dict(os.environ)
        env.update(
            {
                "MD_HOST": self.config.host,
                "MD_PORT": str(self.replica_ports[index]),
                "OMP_WAIT_POLICY": "PASSIVE",
                "MD_TRUSTED_PROXIES": self.config.lb_source,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            }
        )
        store = str(self.config.store)
        if store.startswith("s3://"):
            env["MD_STORE_URL"] = store
        else:
            env.pop("MD_STORE_URL", None)
            env["MD_STORE_DIR"] = str(Path(store).resolve())
        env.update(self.config.replica_env)
        return env

    def start_replica(self, index: int) -> GroupProcess:
        command = [sys.executable, "-m", "multidomain", "serve", "--log-level", "warning"]
        if not self.config.bootstrap:
            command.append("--no-bootstrap")
        log = self.config.work_dir / f"replica-{index + 1}.log"
        process = GroupProcess(self.server_name(index), command, self.replica_environment(index), log)
        self.replicas[index] = process
        return process

    def haproxy_environment(self) -> dict[str, str]:
        assert self.certificate is not None
        c = self.config
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MD_LB_", "MD_REPLICA_"))}
        env.update(
            {
                "MD_LB_HOST": c.host,
                "MD_LB_PORT": str(self.lb_port),
                "MD_LB_TLS_PORT": str(self.lb_tls_port),
                "MD_LB_STATS_PORT": str(self.stats_port),
                "MD_LB_CERT": str(self.certificate),
                "MD_LB_INFERENCE": c.inference_backend,
                "MD_LB_BALANCE_FACTOR": str(c.balance_factor),
                "MD_LB_LOG_LEVEL": c.lb_log_level,
                "MD_LB_SOURCE": c.lb_source,
                **{f"MD_REPLICA_{i + 1}": f"{c.host}:{p}" for i, p in enumerate(self.replica_ports)},
            }
        )
        return env

    def start_haproxy(self) -> GroupProcess:
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not Path(binary).exists():
            raise ClusterError("haproxy is not installed: apt-get install -y haproxy (make install does it)")
        self.certificate = self.certificate or self_signed_certificate(self.config.work_dir, self.config.host)
        command = [binary, "-W", "-db", "-f", str(HAPROXY_CFG)]
        self.haproxy = GroupProcess(
            "haproxy", command, self.haproxy_environment(), self.config.work_dir / "haproxy.log"
        )
        return self.haproxy

    def start(self, timeout: float = 300.0) -> None:
        self.config.work_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        for i in range(REPLICAS):
            self.start_replica(i)
        for i in range(REPLICAS):
            self.wait_replica_ready(i, deadline - time.monotonic())
        self.start_haproxy()
        self.wait_balancer_ready(deadline - time.monotonic())

    def stop(self) -> None:
        for process in [self.haproxy, *reversed(self.replicas)]:
            if process is not None:
                process.stop()

    def kill_replica(self, index: int) -> None:
        process = self.replicas[index]
        assert process is not None
        process.kill()

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.stop()

    # -- readiness ----------------------------------------------------------------------------------
    # Waiting for a condition with a deadline (never a fixed sleep): a process is ready when it says so.
    def wait_replica_ready(self, index: int, timeout: float) -> None:
        process = self.replicas[index]
        assert process is not None
        url = f"{self.replica_url(index)}/readyz"
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if not process.running():
                    raise ClusterError(f"replica {process.name} exited:\n{process.log_tail()}")
                try:
                    if client.get(url).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        raise ClusterError(f"replica {process.name} not ready in {timeout:.0f} s:\n{process.log_tail()}")

    def server_stats(self) -> dict[str, dict[str, str]]:
        """HAProxy's CSV stats of the inference backend's servers: name -> its row (status, scur, ...)."""
        r = httpx.get(f"http://{self.config.host}:{self.stats_port}/stats;csv", timeout=2.0)
        r.raise_for_status()
        rows = csv.DictReader(io.StringIO(r.text.lstrip("# ")))
        return {
            row["svname"]: row
            for row in rows
            if row["pxname"] == "affine" and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def server_states(self) -> dict[str, str]:
        """HAProxy's view of each replica: name -> UP / DOWN / ... (its health checks on /readyz)."""
        return {name: row["status"] for name, row in self.server_stats().items()}

    def wait_stats(
        self, done: Callable[[dict[str, dict[str, str]]], bool], what: str, timeout: float = 60.0
    ) -> None:
        """Until `done(server_stats())` holds; `what` names the condition in the error."""
        deadline = time.monotonic() + timeout
        stats: dict[str, dict[str, str]] = {}
        while time.monotonic() < deadline:
            if self.haproxy is not None and not self.haproxy.running():
                raise ClusterError(f"haproxy exited:\n{self.haproxy.log_tail()}")
            try:
                stats = self.server_stats()
            except httpx.HTTPError:
                stats = {}
            if stats and done(stats):
                return
            time.sleep(0.05)
        seen = {name: (row["status"], row["scur"]) for name, row in stats.items()}
        raise ClusterError(f"haproxy servers (status, current sessions) {seen}, expected {what}")

    def wait_servers(self, expected: Mapping[str, str], timeout: float = 60.0) -> None:
        """Until HAProxy's health checks show `expected` (e.g. {"r2": "DOWN"}) for those servers."""
        self.wait_stats(
            lambda stats: all(stats.get(n, {}).get("status", "").startswith(s) for n, s in expected.items()),
            f"status {dict(expected)}",
            timeout,
        )

    def wait_balancer_ready(self, timeout: float) -> None:
        self.wait_servers({self.server_name(i): "UP" for i in range(REPLICAS)}, timeout)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--store",
        default=os.environ.get("MD_STORE_URL") or os.environ.get("MD_STORE_DIR") or "./store",
        help="store directory or s3://bucket/prefix (default $MD_STORE_URL, else $MD_STORE_DIR, else ./store)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--replica-ports", type=int, nargs=REPLICAS, default=[8001, 8002, 8003])
    parser.add_argument("--port", type=int, default=8080, help="balancer HTTP port")
    parser.add_argument("--tls-port", type=int, default=8443, help="balancer HTTPS port")
    parser.add_argument("--stats-port", type=int, default=8404, help="HAProxy stats page (/stats)")
    parser.add_argument("--work-dir", type=Path, help="certificate and logs (default: a temporary directory)")
    args = parser.parse_args(argv)

    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="md-cluster-"))
    config = ClusterConfig(
        store=args.store,
        work_dir=work_dir,
        host=args.host,
        replica_ports=args.replica_ports,
        lb_port=args.port,
        lb_tls_port=args.tls_port,
        stats_port=args.stats_port,
    )
    cluster = Cluster(config)
    # Ctrl-C and SIGTERM stop the cluster; set explicitly, as a shell's background job inherits SIGINT ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        print(f"starting 3 replicas on ports {cluster.replica_ports} (logs in {work_dir}) ...", flush=True)
        cluster.start()
        print(
            f"ready: {cluster.lb_url} and {cluster.lb_tls_url} (self-signed: {cluster.certificate}); "
            f"replicas {[cluster.replica_url(i) for i in range(REPLICAS)]}; "
            f"stats http://{args.host}:{cluster.stats_port}/stats. Ctrl-C stops all.",
            flush=True,
        )
        while all(p is not None and p.running() for p in [cluster.haproxy, *cluster.replicas]):
            time.sleep(1.0)
        print("a process of the cluster exited; stopping the others", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
