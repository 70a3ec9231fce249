"""One store, three replicas: what is uploaded, activated or rolled back through one replica is what every
replica serves on its next request (each polls the store's revision), directly and through the balancer;
two replicas uploading one domain at the same moment make two distinct, intact versions."""

from __future__ import annotations

import threading

import httpx

from adapters_store import open_store
from deploy.cluster import REPLICAS, Cluster
from tests.cluster.conftest import (
    ADMIN,
    answer_problem,
    classify,
    encode,
    expected,
    image,
    renamed,
    upload,
)
from tests.server.conftest import TinyWorld

IMG = image(11)
PNG = encode(IMG)


def _everywhere(cluster: Cluster, domain: str, version: int, want: dict[int, float]) -> list[str]:
    """What is wrong with the answer of each replica (by its own port) and of the balancer (HTTP, HTTPS)."""
    problems = []
    for i in range(REPLICAS):
        with httpx.Client(base_url=cluster.replica_url(i), timeout=30) as direct:
            problem = answer_problem(classify(direct, domain, PNG), version, want)
            if problem:
                problems.append(f"replica r{i + 1}: {problem}")
    with httpx.Client(base_url=cluster.lb_url, timeout=30) as lb:
        problem = answer_problem(classify(lb, domain, PNG), version, want)
        if problem:
            problems.append(f"balancer: {problem}")
    return problems


def test_upload_activate_rollback_through_one_replica_seen_by_every_replica(
    cluster: Cluster, world: TinyWorld
) -> None:
    v1, v2 = world.artifacts["birds"], world.artifacts["birds_v2"]
    want_v1, want_v2 = expected(world, "birds", IMG), expected(world, "birds_v2", IMG)
    auth = {"Authorization": f"Bearer {ADMIN}"}
    replica = [httpx.Client(base_url=cluster.replica_url(i), timeout=30) for i in range(REPLICAS)]
    try:
        r = upload(replica[0], "birds", v1.manifest, v1.tensors)
        assert r.status_code == 201 and r.json()["version"] == 1, r.text
        assert _everywhere(cluster, "birds", 1, want_v1) == []

        r = upload(replica[1], "birds", v2.manifest, v2.tensors)
        assert r.status_code == 201 and r.json()["version"] == 2, r.text
        assert _everywhere(cluster, "birds", 2, want_v2) == []

        r = replica[2].put("/v1/domains/birds/active", json={"version": 1}, headers=auth)
        assert r.status_code == 200 and r.json()["active"] == 1, r.text
        assert _everywhere(cluster, "birds", 1, want_v1) == []

        with httpx.Client(base_url=cluster.lb_url, timeout=30) as lb:
            r = lb.put("/v1/domains/birds/active", json={"rollback": True}, headers=auth)
        assert r.status_code == 200 and r.json()["active"] == 2, r.text
        assert _everywhere(cluster, "birds", 2, want_v2) == []
        for client in replica:
            detail = client.get("/v1/domains/birds").json()
            assert (detail["versions"], detail["active"]) == ([1, 2], 2)
    finally:
        for client in replica:
            client.close()


def test_two_replicas_uploading_one_domain_at_once_make_two_intact_versions(
    cluster: Cluster, world: TinyWorld
) -> None:
    artifacts = [world.artifacts["birds"], world.artifacts["birds_v2"]]
    references = ["birds", "birds_v2"]
    start = threading.Barrier(2)
    responses: list[httpx.Response | None] = [None, None]

    def put(i: int) -> None:
        with httpx.Client(base_url=cluster.replica_url(i), timeout=60) as client:
            start.wait()  # both bodies leave at the same moment, to two processes
            responses[i] = upload(
                client, "owls", renamed(artifacts[i].manifest, "owls"), artifacts[i].tensors, activate=False
            )

    threads = [threading.Thread(target=put, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None and r.status_code == 201 for r in responses), [r and r.text for r in responses]
    versions = [r.json()["version"] for r in responses if r is not None]
    assert sorted(versions) == [1, 2]  # distinct numbers, neither overwrote the other

    store = open_store(cluster.config.store)
    assert store.verify() == []
    for version, art, reference in zip(versions, artifacts, references, strict=True):
        assert store.get("owls", version).read_tensor_bytes(verify=True) == art.tensors
        with httpx.Client(base_url=cluster.lb_url, timeout=30) as lb:
            r = lb.put(
                "/v1/domains/owls/active",
                json={"version": version},
                headers={"Authorization": f"Bearer {ADMIN}"},
            )
            assert r.status_code == 200, r.text
        assert _everywhere(cluster, "owls", version, expected(world, reference, IMG)) == []
