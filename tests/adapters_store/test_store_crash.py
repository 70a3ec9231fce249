"""Crash safety and multi-process writers, with real subprocesses.

A writer is SIGKILLed at every step of a put (``adapters_store.crashtest``: the child blocks in the
store's fault hook and reports where, the parent kills it; no sleeps). Afterwards the previously
active version must still load, nothing half-written may be listed, and the next put must succeed.
"""

from __future__ import annotations

import multiprocessing
import tempfile
from pathlib import Path
from typing import Any

import pytest

from adapters_store import DomainNotFound, LocalStore, StoreConflict, VersionNotFound, sha256_hex
from adapters_store.crashtest import check_store, run_put
from adapters_store.testing import make_domain_artifact, validated

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

    problems = check_store(
        store,
        "birds",
        before=before,
        known_sha256={1: sha256_hex(old.tensor_bytes)},
        new_version=2,
        new_sha256=sha256_hex(new.tensor_bytes),
        activate=activate,
    )
    assert problems == []
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
    assert sorted(p.name for p in (root / "domains" / "birds").iterdir()) == [
        f"v{v}" for v in store.describe("birds").versions
    ]


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


def _writer(root: str, worker: int, rounds: int, start: Any, writes: Any) -> None:
    """One of two processes: put, activate, roll back and delete on two shared domains.

    Puts the number of its successful writes on ``writes``: each bumps the revision exactly once.
    """
    store = LocalStore(root)
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


def test_two_processes_putting_and_activating_keep_the_index_consistent(tmp_path: Path) -> None:
    root = tmp_path / "store"
    rounds = 12
    ctx = multiprocessing.get_context("spawn")
    start, writes = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(root), w, rounds, start, writes)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]

    store = LocalStore(root)
    assert store.verify() == []
    # No lost update: every successful write of either process bumped the revision once.
    assert store.revision() == writes.get(timeout=10) + writes.get(timeout=10)
    assert store.list_domains() == ["alpha", "beta"]
    for domain in ("alpha", "beta"):
        info = store.describe(domain)
        assert len(set(info.versions)) == len(info.versions)
        assert all(1 <= v <= rounds for v in info.versions)  # 2 workers x rounds/2 puts per domain
        assert info.active in info.versions
        assert store.get(domain).read_tensor_bytes(verify=True)
    # All 12 puts of a domain got distinct numbers, so the next one is 13.
    assert store.put(validated(make_domain_artifact(domain="alpha"))) == rounds + 1
