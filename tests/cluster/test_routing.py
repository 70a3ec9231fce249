"""HAProxy's routing of real requests to three real replicas: one replica per domain (header and path forms,
/v1 and /v2, version paths included), admin calls anywhere, a hot domain spilling over (bounded load),
TLS terminated at the balancer and health checks on /readyz."""

from __future__ import annotations

import math
import os
import signal
import ssl
import threading

import httpx
import pytest

from deploy.cluster import REPLICAS, Cluster
from tests.cluster.conftest import ADMIN, encode, engine_pids, image

PNG = encode(image(3, (24, 24)))


def served_by(r: httpx.Response) -> str:
    name = r.headers.get("x-served-by")
    assert name in ("r1", "r2", "r3"), f"no replica named in {dict(r.headers)}"
    return name


def _every_form(lb: httpx.Client, name: str) -> list[httpx.Response]:
    """Requests naming domain `name` in every way the balancer reads (header, /v1 and /v2 paths)."""
    return [
        lb.post("/v1/classify", content=PNG, headers={"X-Domain": name, "Content-Type": "image/png"}),
        lb.post(f"/v1/domains/{name}/classify", content=PNG, headers={"Content-Type": "image/png"}),
        lb.get(f"/v1/domains/{name}"),
        lb.post(f"/v2/models/{name}/infer", json={"inputs": []}),
        lb.post(f"/v2/models/{name}/versions/1/infer", json={"inputs": []}),
        lb.get(f"/v2/models/{name}"),
        # The path names the domain even when the header disagrees: the server reads the path there.
        lb.get(f"/v1/domains/{name}", headers={"X-Domain": "somewhere-else"}),
    ]


def test_one_domain_always_reaches_the_same_replica_in_every_form(cluster: Cluster) -> None:
    owners: dict[str, str] = {}
    with httpx.Client(base_url=cluster.lb_url, timeout=30) as lb:
        for name in [*(f"dom{i}" for i in range(12)), "digits", "textures"]:
            replicas = [served_by(r) for _ in range(3) for r in _every_form(lb, name)]
            assert len(set(replicas)) == 1, f"{name} reached {replicas}"
            owners[name] = replicas[0]
        ok = lb.post("/v1/classify", content=PNG, headers={"X-Domain": "digits", "Content-Type": "image/png"})
        assert ok.status_code == 200 and ok.json()["domain"] == "digits"
        unknown = lb.post(
            "/v1/classify", content=PNG, headers={"X-Domain": "dom0", "Content-Type": "image/png"}
        )
        assert unknown.status_code == 404 and "dom0" in unknown.text
    # Consistent hashing spreads domains: 14 names do not all land on one replica.
    assert len(set(owners.values())) >= 2, owners


def test_admin_and_domainless_calls_go_to_any_replica(cluster: Cluster) -> None:
    with httpx.Client(base_url=cluster.lb_url, timeout=30) as lb:
        listing = [lb.get("/v1/domains") for _ in range(9)]
        assert all(r.status_code == 200 for r in listing)
        # Round robin, not a hash: spread over the replicas (a replica just back up may be skipped a few
        # turns, so not necessarily all three).
        assert len({served_by(r) for r in listing}) >= 2, [served_by(r) for r in listing]
        # Refused deletions of an unknown version: admin calls, spread too (and nothing is changed).
        deletes = [
            lb.delete("/v1/domains/digits/versions/99", headers={"Authorization": f"Bearer {ADMIN}"})
            for _ in range(9)
        ]
        assert all(r.status_code == 404 for r in deletes), [r.text for r in deletes]
        assert len({served_by(r) for r in deletes}) >= 2, [served_by(r) for r in deletes]
        missing_header = lb.post("/v1/classify", content=PNG, headers={"Content-Type": "image/png"})
        assert missing_header.status_code == 400 and "X-Domain" in missing_header.text


def _sessions(stats: dict[str, dict[str, str]]) -> dict[str, int]:
    return {name: int(row["scur"] or 0) for name, row in stats.items()}


def test_a_hot_domain_spills_over_when_its_replica_is_saturated(cluster: Cluster) -> None:
    with httpx.Client(base_url=cluster.lb_url, timeout=30) as lb:
        owner = served_by(lb.get("/v1/domains/digits"))
    # Requests held in progress at the replicas: their engines stopped, so each front end takes its
    # requests and cannot answer (the balancer holds a request until its body is whole, so a request that
    # never finishes would never reach a replica).
    engines = [pid for i in range(REPLICAS) for pid in engine_pids(cluster, i)]
    answers: list[int | str] = []

    def send() -> None:
        with httpx.Client(base_url=cluster.lb_url, timeout=60) as client:
            try:
                r = client.post(
                    "/v1/domains/digits/classify", content=PNG, headers={"Content-Type": "image/png"}
                )
                answers.append(r.status_code)
            except httpx.TransportError as exc:
                answers.append(f"{type(exc).__name__}: {exc}")

    for pid in engines:
        os.kill(pid, signal.SIGSTOP)
    senders = [threading.Thread(target=send) for _ in range(8)]
    try:
        for t in senders:
            t.start()
        # HAProxy counts a request against its replica once forwarded: wait for all eight (its stats).
        cluster.wait_stats(lambda stats: sum(_sessions(stats).values()) == 8, "8 requests held")
        sessions = _sessions(cluster.server_stats())
    finally:
        for pid in engines:
            os.kill(pid, signal.SIGCONT)
        for t in senders:
            t.join()
    # Bounded load: no replica carries more than factor x the average (8/3) at once (HAProxy rounds its
    # share up), so the hot domain's requests spread over the ring instead of queueing on its owner.
    most = math.ceil(8 * cluster.config.balance_factor / 100 / REPLICAS)
    assert most < 8 and 0 < sessions[owner] <= most, sessions
    assert sum(1 for n in sessions.values() if n) >= 2, sessions
    assert answers == [200] * 8, answers  # held, not lost
    cluster.wait_balancer_ready(60)  # the stopped engines failed a health check or two meanwhile
    with httpx.Client(base_url=cluster.lb_url, timeout=30) as lb:
        assert {served_by(lb.get("/v1/domains/digits")) for _ in range(5)} == {owner}  # home again


def test_tls_is_terminated_at_the_balancer(cluster: Cluster) -> None:
    assert cluster.certificate is not None
    context = ssl.create_default_context(cafile=str(cluster.config.work_dir / "lb-cert.pem"))
    with httpx.Client(base_url=cluster.lb_tls_url, verify=context, timeout=30) as tls:
        r = tls.post("/v1/domains/digits/classify", content=PNG, headers={"Content-Type": "image/png"})
        assert r.status_code == 200 and r.json()["domain"] == "digits"
        assert r.url.scheme == "https"
    with (
        httpx.Client(base_url=cluster.lb_tls_url, timeout=30) as untrusting,
        pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        untrusting.get("/v1/domains")  # a self-signed certificate is refused unless trusted explicitly


def test_health_checks_use_readyz(cluster: Cluster) -> None:
    assert cluster.server_states() == {"r1": "UP", "r2": "UP", "r3": "UP"}
    for i in range(3):
        r = httpx.get(f"{cluster.replica_url(i)}/readyz", timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "ready"
