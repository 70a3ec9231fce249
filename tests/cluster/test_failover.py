"""SIGKILL one replica under load: the balancer routes around it (HAProxy retries the requests the dead
replica dropped and its /readyz check marks it down), no classify fails, no answer comes from a wrong
version, and no upload that was acknowledged is lost. The replica is restarted afterwards for the other tests."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from adapters_store import open_store
from deploy.cluster import Cluster
from tests.cluster.conftest import answer_problem, classify, encode, expected, image, renamed, upload
from tests.server.conftest import TinyWorld

CLIENTS = 4
ANSWERS_BEFORE_KILL = 40
ANSWERS_AFTER_DOWN = 40


@dataclass
class Load:
    answers_before_kill: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    kill_at: float = float("inf")
    down_at: float = float("inf")
    answered: int = 0
    answered_after_down: int = 0
    enough_after_down: threading.Event = field(default_factory=threading.Event)
    problems: list[str] = field(default_factory=list)
    served_after_down: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[float, float, str]] = field(default_factory=list)
    """(started, ended, what) of every request that got no 200."""
    uploads: dict[int, bytes] = field(default_factory=dict)
    """Acknowledged (201) uploads of domain egrets: version -> tensors."""
    upload_failures: list[tuple[float, float, str]] = field(default_factory=list)


def _classify_loop(
    cluster: Cluster, load: Load, wid: int, cases: list[tuple[str, bytes, dict[int, float]]]
) -> None:
    with httpx.Client(base_url=cluster.lb_url, timeout=60) as lb:
        n = wid
        while not load.stop.is_set():
            domain, png, want = cases[n % len(cases)]
            n += 1
            started = time.monotonic()
            try:
                r = classify(lb, domain, png)
                problem = answer_problem(r, 1, want)
            except httpx.TransportError as exc:
                r, problem = None, f"{type(exc).__name__}: {exc}"
            ended = time.monotonic()
            with load.lock:
                if problem is not None:
                    load.failures.append((started, ended, f"{domain}: {problem}"))
                    continue
                load.answered += 1
                if load.answered >= ANSWERS_BEFORE_KILL:
                    load.answers_before_kill.set()
                if r is not None and started > load.down_at:
                    load.served_after_down[r.headers["x-served-by"]] += 1
                    load.answered_after_down += 1
                    if load.answered_after_down >= ANSWERS_AFTER_DOWN:
                        load.enough_after_down.set()


def _upload_loop(cluster: Cluster, load: Load, world: TinyWorld) -> None:
    artifacts = [world.artifacts["birds"], world.artifacts["birds_v2"]]
    with httpx.Client(base_url=cluster.lb_url, timeout=60) as lb:
        n = 0
        while not load.stop.is_set():
            art = artifacts[n % 2]
            n += 1
            started = time.monotonic()
            try:
                r = upload(lb, "egrets", renamed(art.manifest, "egrets"), art.tensors, activate=False)
                what = "" if r.status_code == 201 else f"status {r.status_code}: {r.text[:200]}"
            except httpx.TransportError as exc:
                r, what = None, f"{type(exc).__name__}: {exc}"
            with load.lock:
                if r is not None and r.status_code == 201:
                    version = r.json()["version"]
                    assert version not in load.uploads, f"version {version} acknowledged twice"
                    load.uploads[version] = art.tensors
                else:
                    load.upload_failures.append((started, time.monotonic(), what))


def test_sigkill_one_replica_under_load(cluster: Cluster, world: TinyWorld) -> None:
    heron = world.artifacts["birds"]
    with httpx.Client(base_url=cluster.lb_url, timeout=60) as lb:
        assert upload(lb, "herons", renamed(heron.manifest, "herons"), heron.tensors).status_code == 201
        owners = {
            d: lb.get(f"/v1/domains/{d}").headers["x-served-by"] for d in ("digits", "textures", "herons")
        }
    cases = []
    for seed, (domain, reference) in enumerate(
        [("digits", "digits"), ("textures", "textures"), ("herons", "birds")]
    ):
        img = image(40 + seed)
        cases.append((domain, encode(img), expected(world, reference, img)))
    victim_name = owners["digits"]  # the replica holding a domain under load
    victim = int(victim_name[1:]) - 1

    load = Load()
    threads = [
        threading.Thread(target=_classify_loop, args=(cluster, load, w, cases)) for w in range(CLIENTS)
    ]
    threads.append(threading.Thread(target=_upload_loop, args=(cluster, load, world)))
    for t in threads:
        t.start()
    try:
        assert load.answers_before_kill.wait(120), f"no load: {load.failures[:3]}"
        load.kill_at = time.monotonic()
        cluster.kill_replica(victim)
        cluster.wait_servers({victim_name: "DOWN"})
        load.down_at = time.monotonic()
        assert load.enough_after_down.wait(120), f"no answers after the kill: {load.failures[:3]}"
    finally:
        load.stop.set()
        for t in threads:
            t.join()
        process = cluster.replicas[victim]
        if process is None or not process.running():
            cluster.start_replica(victim)  # back for the other tests, whatever happened here
            cluster.wait_replica_ready(victim, 300)
            cluster.wait_servers({victim_name: "UP"})

    # Routed around: once its health check failed nothing was sent to the dead replica, and every answer
    # is from version 1 with the model library's probabilities. Not one classify failed: HAProxy holds
    # each inference request whole and sends the ones the dead replica dropped to another (retry-on).
    assert load.failures == [], load.failures[:5]
    assert victim_name not in load.served_after_down and load.served_after_down, load.served_after_down
    # No acknowledged upload lost: each is listed with exactly its bytes, under its own number. An upload
    # may fail only if it was in flight when the replica died (it is then stored whole or not at all).
    in_flight = [f for f in load.upload_failures if f[0] <= load.down_at and f[1] >= load.kill_at]
    assert in_flight == load.upload_failures and len(in_flight) <= 1, load.upload_failures
    store = open_store(cluster.config.store)
    assert store.verify() == []
    stored = store.describe("egrets").versions
    assert set(load.uploads) <= set(stored) and len(stored) <= len(load.uploads) + len(in_flight)
    for version, tensors in load.uploads.items():
        assert store.get("egrets", version).read_tensor_bytes(verify=True) == tensors
