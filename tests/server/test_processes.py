"""The multi-process server itself: torch-free front ends, uploads seen by every front end, an engine
killed under load, two engines with domain affinity, and SIGTERM by the supervisor's PID."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from server.protocol import affinity
from tests.server.conftest import (
    DOMAINS,
    TOL,
    Processes,
    TinyWorld,
    auth,
    encode,
    image,
    make_store,
    reset_store,
    start_processes,
)

PNG = {"Content-Type": "image/png"}


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _connection_to(url: str, pid: int) -> httpx.Client:
    """A client whose (keep-alive) connection is served by front end `pid` (connections are spread by the
    kernel: open new ones until that process has accepted one)."""
    for _ in range(200):
        c = httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=1))
        if c.get("/healthz").headers.get("x-md-frontend") == str(pid):
            return c
        c.close()
    raise AssertionError(f"no connection reached front end {pid}")


def test_front_ends_do_not_load_torch(processes: Processes) -> None:
    frontends = processes.pids("frontend")
    engines = processes.pids("engine")
    assert len(frontends) == 2 and len(engines) == 1
    assert set(frontends.values()) | set(engines.values()) <= set(_children(processes.proc.pid))
    for pid in frontends.values():
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "libtorch" not in maps, f"front end {pid} has torch loaded"
    assert "libtorch" in Path(f"/proc/{engines[0]}/maps").read_text()  # the check can fail


def test_front_ends_run_under_sched_batch_and_the_engine_does_not(processes: Processes) -> None:
    """MD_FRONTEND_SCHED_BATCH (default true): every front-end thread is SCHED_BATCH, so its wake-ups do not
    preempt the engine's intra-op threads; the engine keeps the policy it was started with. Under a
    real-time policy (a `chrt` run of the suite) the front ends keep it too."""
    inherited = os.sched_getscheduler(0)
    expected = os.SCHED_BATCH if inherited == os.SCHED_OTHER else inherited

    def policies(pid: int) -> set[int]:
        return {os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}

    for pid in processes.pids("frontend").values():
        assert policies(pid) == {expected}, f"front end {pid}"
    [engine] = processes.pids("engine").values()
    assert policies(engine) == {inherited}


def test_an_upload_through_one_front_end_is_served_by_the_others(
    processes: Processes, world: TinyWorld
) -> None:
    with httpx.Client(base_url=processes.url) as any_client:
        reset_store(world, any_client, processes.store, ("digits",))
    first, second = processes.pids("frontend").values()
    a, b = _connection_to(processes.url, first), _connection_to(processes.url, second)
    try:
        art = world.artifacts["birds"]
        files = {"manifest": ("manifest.json", art.manifest), "tensors": ("adapter.safetensors", art.tensors)}
        r = a.post("/v1/domains/birds/adapters", files=files, headers=auth(), params={"activate": "true"})
        assert r.status_code == 201, r.text
        img = image(31)
        answer = b.post("/v1/classify", content=encode(img), headers={**PNG, "X-Domain": "birds"})
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-md-frontend"] == str(second)
        got = [e["probability"] for e in answer.json()["results"][0]["top_k"]]
        assert answer.json()["version"] == 1
        assert got == pytest.approx(sorted(world.reference("birds", img).tolist(), reverse=True), abs=TOL)
        # a refused upload through b is refused for everyone, and nothing is stored
        bad = b.post(
            "/v1/domains/birds/adapters",
            files={
                "manifest": ("m.json", art.manifest),
                "tensors": ("a.safetensors", art.tensors[:-8] + bytes(8)),
            },
            headers=auth(),
        )
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_artifact"
        assert a.get("/v1/domains/birds").json()["versions"] == [1]
    finally:
        a.close()
        b.close()


def test_engine_killed_under_load_gives_503s_then_recovers(processes: Processes, world: TinyWorld) -> None:
    with httpx.Client(base_url=processes.url, timeout=60) as c:
        reset_store(world, c, processes.store, tuple(DOMAINS))
    body = encode(image(5))
    engine = processes.pids("engine")[0]

    answered, killed = threading.Event(), threading.Event()

    def client_loop() -> list[int]:
        statuses: list[int] = []
        with httpx.Client(base_url=processes.url, timeout=60) as c:
            # load until the kill, then as many requests again as there were before it
            while not killed.is_set() or len(statuses) < 2 * before[0]:
                domain = list(DOMAINS)[len(statuses) % 3]
                r = c.post("/v1/classify", content=body, headers={**PNG, "X-Domain": domain})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    answered.set()
                if not killed.is_set():
                    before[0] = max(before[0], len(statuses))
                if len(statuses) > 5000:
                    break
        return statuses

    before = [0]
    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(client_loop) for _ in range(4)]
        assert answered.wait(timeout=120)  # the load is being served
        os.kill(engine, signal.SIGKILL)
        killed.set()
        processes.wait_for("md-event exited kind=engine")
        statuses = [s for f in running for s in f.result(timeout=300)]
    assert set(statuses) <= {200, 503}, set(statuses)
    assert 503 in statuses and 200 in statuses
    # the supervisor restarted it; every front end reconnects and serves again
    processes.wait_for("md-event engine-ready")
    processes.wait_for("md-event frontend-connected", count=2)
    assert processes.pids("engine")[0] != engine
    with httpx.Client(base_url=processes.url, timeout=60) as c:
        assert c.get("/readyz").status_code == 200
        r = c.post("/v1/classify", content=body, headers={**PNG, "X-Domain": "birds"})
        assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def two_engines(world: TinyWorld, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    store = make_store(world, tmp_path_factory.mktemp("two") / "store")
    running = start_processes(store, workers=1, devices="cpu,cpu")
    yield running
    assert running.stop() == 0


def test_two_engines_each_serve_their_own_domains(two_engines: Processes, world: TinyWorld) -> None:
    owners = {d: affinity(d, 2) for d in DOMAINS}
    assert set(owners.values()) == {0, 1}, "the test needs domains on both engines"
    with httpx.Client(base_url=two_engines.url, timeout=60) as c:
        for seed, domain in enumerate(DOMAINS):
            img = image(seed)
            r = c.post("/v1/classify", content=encode(img), headers={**PNG, "X-Domain": domain})
            assert r.status_code == 200, r.text
            got = [e["probability"] for e in r.json()["results"][0]["top_k"]]
            ref = sorted(world.reference(domain, img).tolist(), reverse=True)[:5]
            assert got == pytest.approx(ref, abs=TOL)
        text = c.get("/metrics").text
        for domain, owner in owners.items():
            assert f'md_domain_resident{{domain="{domain}",engine="{owner}",version="1"}} 1.0' in text
            assert f'md_domain_resident{{domain="{domain}",engine="{1 - owner}",version="1"}}' not in text
        # a deletion through the API drops the domain from its engine's bank and its series
        assert c.delete("/v1/domains/birds", headers=auth()).status_code == 200
        assert 'md_domain_resident{domain="birds"' not in c.get("/metrics").text
        assert c.get("/v1/domains/digits").json()["resident"] is True


def test_sigterm_to_the_supervisor_stops_every_child(world: TinyWorld, tmp_path: Path) -> None:
    running = start_processes(make_store(world, tmp_path / "store"), workers=1)
    children = _children(running.proc.pid)
    assert len(children) == 2
    assert running.stop() == 0
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
