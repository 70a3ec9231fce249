"""Inference requests a replica had taken when it died are answered by another replica (HAProxy's L7
retries), whatever the body's size up to the balancer's buffer; uploads are never replayed.

The cause this pins down: HAProxy can replay only a request it holds whole. Without `option
http-buffer-request` it forwards the headers as soon as they arrive and the body after (httpx writes them
separately), and a body larger than `tune.bufsize` (16 KiB by default, smaller than most photos) is
never kept; such a request caught by a dying replica was not retried, and HAProxy 2.6 closed the
client's connection without a response or a log line (what bench/cluster.py counted as lost). Here the
requests are made to be in flight at the replica when it dies: its engine is stopped (SIGSTOP) so its
front end holds it, HAProxy's stats show it on that replica, then the replica is SIGKILLed. Uploads are
not replayed (backend "any" retries only connections never made): tests/cluster/test_failover.py.
"""

from __future__ import annotations

import os
import signal
import threading

import httpx
import pytest

from deploy.cluster import Cluster
from tests.cluster.conftest import answer_problem, classify, encode, engine_pids, expected, image
from tests.server.conftest import TinyWorld


@pytest.mark.parametrize(
    "size",
    [(24, 24), (96, 96)],
    ids=["small body", "body over HAProxy's default 16 KiB buffer"],
)
def test_a_request_in_flight_at_a_dying_replica_is_answered_by_another(
    cluster: Cluster, world: TinyWorld, size: tuple[int, int]
) -> None:
    img = image(70, size)
    png, want = encode(img), expected(world, "digits", img)
    assert (len(png) > 16 * 1024) == (size[0] > 24)
    with httpx.Client(base_url=cluster.lb_url, timeout=60) as lb:
        r = classify(lb, "digits", png)
        assert answer_problem(r, 1, want) is None
        owner_name = r.headers["x-served-by"]
    owner = int(owner_name[1:]) - 1
    [engine] = engine_pids(cluster, owner)

    # One request at a time: a second one would spill to another replica (bounded load).
    result: list[httpx.Response | str] = []

    def send() -> None:
        with httpx.Client(base_url=cluster.lb_url, timeout=60) as client:
            try:
                result.append(classify(client, "digits", png))
            except httpx.TransportError as exc:
                result.append(f"{type(exc).__name__}: {exc}")

    os.kill(engine, signal.SIGSTOP)  # the replica's front end takes the request and cannot answer it
    sender = threading.Thread(target=send)
    try:
        sender.start()
        cluster.wait_stats(
            lambda stats: int(stats[owner_name]["scur"] or 0) == 1, f"the request at {owner_name}"
        )
        cluster.kill_replica(owner)  # the whole replica, its stopped engine included
        sender.join()
    finally:
        process = cluster.replicas[owner]
        if process is not None and process.running():
            process.kill()
        sender.join()
        cluster.start_replica(owner)  # back for the other tests
        cluster.wait_replica_ready(owner, 300)
        cluster.wait_servers({owner_name: "UP"})

    [r] = result
    assert isinstance(r, httpx.Response), f"{len(png)}-byte request: {r}"
    assert answer_problem(r, 1, want) is None, answer_problem(r, 1, want)
    assert r.headers["x-served-by"] != owner_name
