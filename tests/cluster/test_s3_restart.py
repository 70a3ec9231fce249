"""The S3 server (SeaweedFS) stopped and started again under load: while it is down the replicas answer
from their banks or say 503 store_unavailable (never another 5xx, never a wrong version); once it is back
they serve, take uploads and see each other's changes again without being restarted themselves."""

from __future__ import annotations

import subprocess
import threading
import time
from collections import Counter

import httpx
import psutil

from adapters_store import open_store
from adapters_store.seaweedfs import SeaweedFS
from deploy.cluster import REPLICAS, Cluster
from tests.cluster.conftest import answer_problem, classify, encode, expected, image, renamed, upload
from tests.server.conftest import TinyWorld

CLIENTS = 3


def _restart(seaweed: SeaweedFS, url: str) -> None:
    """Stop the S3 server and start it again with its own command line (same ports, same data); return
    once it serves the store's index again (its S3 API answers a moment before its filer does)."""
    command = psutil.Process(seaweed.process.pid).cmdline()
    seaweed.stop()
    with open(seaweed.log_path, "ab") as log:
        seaweed.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 90
    while True:  # a starting process: there is no event to wait on, only its answer
        try:
            open_store(url).describe_all()
            return
        except Exception:
            if seaweed.process.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_s3_restarted_under_load_replicas_recover(
    cluster: Cluster, world: TinyWorld, seaweed: SeaweedFS
) -> None:
    img = image(60)
    png = encode(img)
    cases = [("digits", expected(world, "digits", img)), ("textures", expected(world, "textures", img))]
    statuses: Counter[str] = Counter()
    problems: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def load(wid: int) -> None:
        with httpx.Client(base_url=cluster.lb_url, timeout=60) as lb:
            n = wid
            while not stop.is_set():
                domain, want = cases[n % 2]
                n += 1
                try:
                    r = classify(lb, domain, png)
                except httpx.TransportError as exc:
                    with lock:
                        statuses[type(exc).__name__] += 1
                    continue
                with lock:
                    statuses[str(r.status_code)] += 1
                    if r.status_code == 503:
                        if r.json()["error"]["code"] != "store_unavailable":
                            problems.append(f"503 {r.text[:200]}")
                    elif (problem := answer_problem(r, 1, want)) is not None:
                        problems.append(f"{domain}: {problem}")

    pids = [p.pid for p in cluster.replicas if p is not None]
    threads = [threading.Thread(target=load, args=(w,)) for w in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        _restart(seaweed, str(cluster.config.store))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert problems == [], problems[:5]
    assert set(statuses) <= {"200", "503"}, statuses  # no other status, no dropped connection
    assert statuses["200"] > 0, statuses

    # Back: every replica, by its own port, serves again and sees an upload made through another.
    art = world.artifacts["birds_v2"]
    with httpx.Client(base_url=cluster.replica_url(0), timeout=60) as first:
        r = upload(first, "kites", renamed(art.manifest, "kites"), art.tensors)
        assert r.status_code == 201 and r.json()["version"] == 1, r.text
    want = expected(world, "birds_v2", img)
    for i in range(REPLICAS):
        with httpx.Client(base_url=cluster.replica_url(i), timeout=60) as direct:
            for domain, w in [*cases, ("kites", want)]:
                assert answer_problem(classify(direct, domain, png), 1, w) is None, f"replica r{i + 1}"
    # The same replica processes throughout: none was restarted.
    assert [p.pid for p in cluster.replicas if p is not None and p.running()] == pids
