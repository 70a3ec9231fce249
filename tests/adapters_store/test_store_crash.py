"""Crash safety and multi-process writers, with real subprocesses, on both backends.

A writer is SIGKILLed at every step of a put (``adapters_store.crashtest``: the child blocks in the
store's fault hook and reports where, the parent kills it; no sleeps). Afterwards the previously
active version must still load, nothing half-written may be listed, and the next put must succeed.
Concurrent writers in separate processes never lose a version and never share a number.
"""

from __future__ import annotations

import multiprocessing
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from adapters_store import (
    AdapterStore,
    DomainNotFound,
    LocalStore,
    StoreConflict,
    VersionNotFound,
    open_store,
    sha256_hex,
)
from adapters_store.crashtest import check_store, run_put
from adapters_store.index import DomainVersions, StoreIndex
from adapters_store.s3 import S3Store
from adapters_store.seaweedfs import SeaweedFS
from adapters_store.testing import ArtifactFiles, make_domain_artifact, validated
from tests.adapters_store.conftest import s3_url, write_count

CHUNK = 512  # small chunks so a kill also lands between chunks of one file


def _steps_of_a_put() -> list[str]:
    """The put's steps, from an in-process put with a recording hook (deterministic)."""
    steps: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp), fault_hook=steps.append, chunk_bytes=CHUNK)
        store.put(validated(make_domain_artifact(domain="birds", seed=1)), activate=True)
    return steps


STEPS = _steps_of_a_put()


def test_a_put_has_the_expected_steps() -> None:
    assert STEPS[0] == "locked" and STEPS[-1] == "index-synced"
    assert STEPS.count("write:adapter.safetensors") >= 2  # the kill can land mid-file
    assert STEPS.index("published") < STEPS.index("index-renamed")


def _problems_after_kill(
    store: AdapterStore, before: DomainVersions, old: ArtifactFiles, new: ArtifactFiles, activate: bool
) -> list[str]:
    """check_store after a killed put of ``new`` (v2) onto a store holding ``old`` (v1)."""
    return check_store(
        store,
        "birds",
        before=before,
        known_sha256={1: sha256_hex(old.tensor_bytes)},
        new_version=2,
        new_sha256=sha256_hex(new.tensor_bytes),
        activate=activate,
    )


# Every step with activation; without it, the steps around publication (the rest behave the same).
CASES = [(k, True) for k in range(1, len(STEPS) + 1)] + [
    (STEPS.index(step) + 1, False) for step in ("published", "index-staged", "index-renamed", "index-synced")
]


@pytest.mark.parametrize(
    ("kill_at", "activate"), CASES, ids=[f"{k}-{STEPS[k - 1]}-{'act' if a else 'noact'}" for k, a in CASES]
)
def test_sigkill_mid_put_leaves_the_store_consistent(tmp_path: Path, kill_at: int, activate: bool) -> None:
    root = tmp_path / "store"
    store = LocalStore(root)
    old = make_domain_artifact(domain="birds", seed=0)
    new = make_domain_artifact(domain="birds", seed=1)
    store.put(validated(old), activate=True)
    before = store.describe("birds")
    bundle = tmp_path / "new.tar"
    bundle.write_bytes(new.bundle())

    outcome = run_put(root, bundle, kill_at, activate=activate, chunk_bytes=CHUNK)
    assert outcome.killed_at == STEPS[kill_at - 1]

    assert _problems_after_kill(store, before, old, new, activate) == []
    # Only the index rename publishes the put; before it the store is exactly as it was.
    landed = 2 in store.describe("birds").versions
    assert landed == (kill_at >= STEPS.index("index-renamed") + 1)
    assert store.get("birds").read_tensor_bytes() == (
        new.tensor_bytes if landed and activate else old.tensor_bytes
    )
    # The lock died with the writer; the next put succeeds and sweeps what the dead one left.
    version = store.put(validated(new), activate=True)
    assert version == (3 if landed else 2)
    assert store.verify() == []
    assert list((root / "tmp").iterdir()) == []
    listed = StoreIndex.model_validate_json((root / "index.json").read_bytes()).domains["birds"].versions
    assert sorted(p.name for p in (root / "domains" / "birds").iterdir()) == sorted(
        r.key for r in listed.values()
    )


def test_sigkill_during_the_first_put_of_a_domain(tmp_path: Path) -> None:
    root = tmp_path / "store"
    new = make_domain_artifact(domain="birds", seed=1)
    bundle = tmp_path / "new.tar"
    bundle.write_bytes(new.bundle())
    run_put(root, bundle, STEPS.index("published") + 1, activate=True, chunk_bytes=CHUNK)
    store = LocalStore(root)
    with pytest.raises(DomainNotFound):
        store.describe("birds")
    assert store.list_domains() == []
    assert store.put(validated(new), activate=True) == 1


def _writer(location: str, worker: int, rounds: int, start: Any, writes: Any) -> None:
    """One of two processes: put, activate, roll back and delete on two shared domains.

    Puts the number of its successful writes on ``writes``: each bumps the revision exactly once.
    """
    store = open_store(location)
    artifacts = {d: validated(make_domain_artifact(domain=d, seed=worker)) for d in ("alpha", "beta")}
    count = 0
    start.wait()
    for i in range(rounds):
        domain = ("alpha", "beta")[i % 2]
        version = store.put(artifacts[domain])
        store.activate(domain, version)  # a new version is never active yet: always a write
        count += 2
        if i % 3 == 2:
            try:
                store.rollback(domain)
                count += 1
            except StoreConflict:
                pass
        if i % 4 == 3:
            try:
                store.delete_version(domain, version)  # refused if it is active again
                count += 1
            except (StoreConflict, VersionNotFound):
                pass
    writes.put(count)


def _location(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "local":
        return str(tmp_path / "store")
    request.getfixturevalue("s3_env")  # the children inherit the AWS_* settings
    return s3_url()


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_two_processes_putting_and_activating_keep_the_index_consistent(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    location = _location(backend, tmp_path, request)
    rounds = 12
    ctx = multiprocessing.get_context("spawn")
    start, writes = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(location, w, rounds, start, writes)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]

    store = open_store(location)
    assert store.verify() == []
    # No lost update: every successful write of either process bumped the revision once.
    assert write_count(store) == writes.get(timeout=10) + writes.get(timeout=10)
    assert store.list_domains() == ["alpha", "beta"]
    for domain in ("alpha", "beta"):
        info = store.describe(domain)
        assert len(set(info.versions)) == len(info.versions)
        assert all(1 <= v <= rounds for v in info.versions)  # 2 workers x rounds/2 puts per domain
        assert info.active in info.versions
        assert store.get(domain).read_tensor_bytes(verify=True)
    # All 12 puts of a domain got distinct numbers, so the next one is 13.
    assert store.put(validated(make_domain_artifact(domain="alpha"))) == rounds + 1


def _same_domain_writer(location: str, worker: int, rounds: int, start: Any, results: Any) -> None:
    store = open_store(location)
    artifact = validated(make_domain_artifact(domain="birds", seed=100 + worker))
    start.wait()
    results.put((worker, [store.put(artifact) for _ in range(rounds)]))


def _first_put_writer(location: str, worker: int, rounds: int, start: Any, results: Any) -> None:
    store = open_store(location)
    artifact = validated(make_domain_artifact(domain="imagenet", seed=200 + worker))
    start.wait()
    results.put((worker, [store.put_if_new(artifact, activate=True)]))


def _race(location: str, target: Any, workers: int, rounds: int) -> dict[int, list[int | None]]:
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=target, args=(location, w, rounds, start, results)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * workers
    return dict(results.get(timeout=10) for _ in range(workers))


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_two_processes_putting_the_same_domain_get_distinct_intact_versions(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    location = _location(backend, tmp_path, request)
    rounds = 6
    got = _race(location, _same_domain_writer, 2, rounds)
    numbers = [v for versions in got.values() for v in versions]
    assert sorted(numbers) == list(range(1, 2 * rounds + 1))  # none lost, none shared
    store = open_store(location)
    assert store.describe("birds").versions == tuple(range(1, 2 * rounds + 1))
    for worker, versions in got.items():
        want = sha256_hex(make_domain_artifact(domain="birds", seed=100 + worker).tensor_bytes)
        for version in versions:
            assert version is not None
            assert sha256_hex(store.get("birds", version).read_tensor_bytes(verify=True)) == want
    assert store.verify() == []


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_three_processes_bootstrapping_at_once_make_one_version(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    location = _location(backend, tmp_path, request)
    got = _race(location, _first_put_writer, 3, 1)
    made = [versions[0] for versions in got.values()]
    assert sorted(made, key=lambda v: v is None) == [1, None, None]
    store = open_store(location)
    info = store.describe("imagenet")
    assert (info.versions, info.active) == ((1,), 1)
    winner = next(w for w, versions in got.items() if versions[0] == 1)
    want = make_domain_artifact(domain="imagenet", seed=200 + winner).tensor_bytes
    assert store.get("imagenet").read_tensor_bytes() == want
    assert store.verify() == []


# -- S3: SIGKILL at every step of a put ----------------------------------------------------------------


def _s3_steps() -> list[str]:
    steps: list[str] = []
    store = S3Store.from_url(s3_url(), fault_hook=steps.append)
    store.put(validated(make_domain_artifact(domain="birds", seed=1)), activate=True)
    return steps


S3_STEPS = [
    "begin",
    "write:adapter.safetensors",
    "write:manifest.json",
    "staged",
    "index-read",
    "index-written",
]


def test_an_s3_put_has_the_expected_steps(s3_env: SeaweedFS) -> None:
    assert _s3_steps() == S3_STEPS


@pytest.mark.parametrize("kill_at", range(1, len(S3_STEPS) + 1), ids=S3_STEPS)
def test_sigkill_mid_s3_put_leaves_no_visible_partial_version(
    s3_env: SeaweedFS, tmp_path: Path, kill_at: int
) -> None:
    location = s3_url()
    store = open_store(location)
    old = make_domain_artifact(domain="birds", seed=0)
    new = make_domain_artifact(domain="birds", seed=1)
    store.put(validated(old), activate=True)
    before = store.describe("birds")
    revision = store.revision()
    bundle = tmp_path / "new.tar"
    bundle.write_bytes(new.bundle())

    outcome = run_put(location, bundle, kill_at, activate=True)
    assert outcome.killed_at == S3_STEPS[kill_at - 1]
    assert _problems_after_kill(store, before, old, new, True) == []
    # Only the conditional index write publishes the put; before it nothing a reader sees changed.
    landed = 2 in store.describe("birds").versions
    assert landed == (S3_STEPS[kill_at - 1] == "index-written")
    assert (store.revision() == revision) == (not landed)
    assert store.put(validated(new), activate=True) == (3 if landed else 2)
    assert store.verify() == []
    # What the killed writer uploaded and never listed is garbage, collected once old enough.
    assert isinstance(store, S3Store)
    orphans = store.collect_garbage(min_age=timedelta(0))
    assert len(orphans) == (0 if landed else min(kill_at - 1, 2))  # the objects uploaded before the kill
    assert store.verify() == [] and store.collect_garbage(min_age=timedelta(0)) == []
