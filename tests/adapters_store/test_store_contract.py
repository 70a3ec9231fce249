"""The ``AdapterStore`` contract, on both backends (``any_store``: LocalStore and S3Store on SeaweedFS).

Versions, aliases, deletes, the opaque revision, the backbone, quotas, idempotent first puts,
one-read listing, concurrent writers and copying between backends.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest

from adapters_store import (
    AdapterStore,
    ArtifactInvalid,
    BackboneNotFound,
    DomainNotFound,
    LocalStore,
    StoreConflict,
    StoreQuotaExceeded,
    StoreQuotas,
    ValidatedArtifact,
    VersionNotFound,
    open_store,
    validate_backbone_artifact,
)
from adapters_store.copy import copy_store
from adapters_store.s3 import S3Store
from adapters_store.testing import ArtifactFiles, make_backbone_artifact, make_domain_artifact, validated
from tests.adapters_store.conftest import s3_url, write_count


def put(store: AdapterStore, domain: str = "birds", *, seed: int = 0, activate: bool = False) -> int:
    return store.put(validated(make_domain_artifact(domain=domain, seed=seed)), activate=activate)


def put_backbone(store: AdapterStore, fingerprint: str | None = None) -> None:
    files = make_backbone_artifact(**({"fingerprint": fingerprint} if fingerprint else {}))
    store.put_backbone(validate_backbone_artifact(files.manifest_bytes, files.tensor_bytes))


def with_quotas(store: AdapterStore, **quotas: int) -> AdapterStore:
    """Another handle on the same store, with quotas."""
    location = store.root if isinstance(store, LocalStore) else store.url  # type: ignore[attr-defined]
    return open_store(location, quotas=StoreQuotas(**quotas))


def test_is_an_adapter_store(any_store: AdapterStore) -> None:
    assert isinstance(any_store, AdapterStore)


def test_put_get_round_trip(any_store: AdapterStore, artifact: ArtifactFiles) -> None:
    version = any_store.put(validated(artifact), activate=True)
    assert version == 1
    stored = any_store.get("birds")
    assert stored.version == 1 and stored.domain == "birds"
    assert stored.manifest == artifact.manifest.model_copy(update={"version": 1})
    assert stored.read_tensor_bytes() == artifact.tensor_bytes


def test_fp16_round_trip(any_store: AdapterStore) -> None:
    files = make_domain_artifact(dtype="float16")
    any_store.put(validated(files), activate=True)
    assert any_store.get("example").manifest.dtype == "float16"
    assert any_store.get("example").read_tensor_bytes() == files.tensor_bytes


def test_versions_increase_and_are_never_reused(any_store: AdapterStore) -> None:
    assert [put(any_store, seed=i) for i in range(3)] == [1, 2, 3]
    any_store.delete_version("birds", 3)
    assert put(any_store) == 4
    any_store.delete_domain("birds")
    assert any_store.list_domains() == []
    assert put(any_store) == 5
    assert any_store.describe("birds").versions == (5,)


def test_versions_are_per_domain(any_store: AdapterStore) -> None:
    assert (put(any_store, "birds"), put(any_store, "cars"), put(any_store, "birds")) == (1, 1, 2)
    assert any_store.list_domains() == ["birds", "cars"]


def test_describe_all_lists_every_domain_from_one_read(any_store: AdapterStore) -> None:
    put(any_store, "cars", activate=True)
    put(any_store, "birds")
    put(any_store, "birds", seed=1, activate=True)
    any_store.activate("birds", 1)
    infos = any_store.describe_all()
    assert [i.domain for i in infos] == ["birds", "cars"]
    assert infos == [any_store.describe("birds"), any_store.describe("cars")]
    assert (infos[0].versions, infos[0].active, infos[0].previous) == ((1, 2), 1, (2,))


def test_new_version_is_inactive_unless_asked(any_store: AdapterStore) -> None:
    put(any_store)
    with pytest.raises(VersionNotFound):
        any_store.get("birds")
    assert any_store.get("birds", 1).version == 1
    assert any_store.describe("birds").active is None
    put(any_store, activate=True)
    assert any_store.get("birds").version == 2


def test_activate_and_rollback(any_store: AdapterStore) -> None:
    for i in range(3):
        put(any_store, seed=i)
    any_store.activate("birds", 1)
    any_store.activate("birds", 3)
    any_store.activate("birds", 2)
    assert any_store.describe("birds").previous == (1, 3)
    assert any_store.rollback("birds") == 3
    assert any_store.get("birds").version == 3
    assert any_store.rollback("birds") == 1
    with pytest.raises(StoreConflict):
        any_store.rollback("birds")
    assert any_store.get("birds").version == 1


def test_rollback_skips_deleted_versions(any_store: AdapterStore) -> None:
    for i in range(3):
        put(any_store, seed=i, activate=True)
    any_store.delete_version("birds", 2)
    assert any_store.rollback("birds") == 1


def test_activate_unknown_version(any_store: AdapterStore) -> None:
    put(any_store)
    with pytest.raises(VersionNotFound):
        any_store.activate("birds", 7)


def test_deleting_the_active_version_is_refused(any_store: AdapterStore) -> None:
    put(any_store, activate=True)
    put(any_store)
    with pytest.raises(StoreConflict):
        any_store.delete_version("birds", 1)
    assert any_store.get("birds").version == 1
    stale = any_store.get("birds", 2)
    any_store.delete_version("birds", 2)
    with pytest.raises(VersionNotFound):
        any_store.get("birds", 2)
    with pytest.raises(VersionNotFound):
        stale.read_tensor_bytes()  # a handle read before the delete finds its objects gone
    with pytest.raises(VersionNotFound):
        any_store.delete_version("birds", 2)


def test_delete_domain(any_store: AdapterStore) -> None:
    put(any_store, activate=True)
    any_store.delete_domain("birds")
    with pytest.raises(DomainNotFound):
        any_store.get("birds")
    with pytest.raises(DomainNotFound):
        any_store.delete_domain("birds")
    assert any_store.describe_all() == []


@pytest.mark.parametrize("name", ["nope", "../birds", "birds/v1", "", "BIRDS"])
def test_unknown_or_unsafe_domains_are_not_found(any_store: AdapterStore, name: str) -> None:
    put(any_store, activate=True)
    for call in (
        lambda: any_store.get(name),
        lambda: any_store.describe(name),
        lambda: any_store.activate(name, 1),
    ):
        with pytest.raises(DomainNotFound):
            call()


def test_the_opaque_revision_changes_on_every_write_and_only_then(any_store: AdapterStore) -> None:
    seen = [any_store.revision()]

    def changed() -> bool:
        revision = any_store.revision()
        fresh = revision not in seen
        seen.append(revision)
        return fresh

    put(any_store)
    assert changed()
    put(any_store, activate=True)
    assert changed()
    any_store.get("birds")
    any_store.describe("birds")
    any_store.describe_all()
    any_store.activate("birds", 2)  # already active: nothing written
    assert any_store.revision() == seen[-1]
    for write in (
        lambda: any_store.activate("birds", 1),
        lambda: any_store.rollback("birds"),
        lambda: any_store.delete_version("birds", 1),
        lambda: any_store.delete_domain("birds"),
        lambda: put_backbone(any_store),
    ):
        write()
        assert changed()
    put_backbone(any_store)  # the same backbone again: nothing written
    assert any_store.revision() == seen[-1]
    assert write_count(any_store) == 7


def test_backbone_round_trip(any_store: AdapterStore) -> None:
    with pytest.raises(BackboneNotFound):
        any_store.get_backbone()
    files = make_backbone_artifact()
    any_store.put_backbone(validate_backbone_artifact(files.manifest_bytes, files.tensor_bytes))
    stored = any_store.get_backbone()
    assert stored.manifest == files.manifest
    assert stored.read_tensor_bytes() == files.tensor_bytes


def test_domains_must_match_the_stored_backbone(any_store: AdapterStore) -> None:
    put_backbone(any_store)
    put(any_store, activate=True)
    other = make_domain_artifact(domain="cars", fingerprint="a" * 64)
    with pytest.raises(StoreConflict):
        any_store.put(validated(other, fingerprint="a" * 64))
    with pytest.raises(StoreConflict):
        put_backbone(any_store, "a" * 64)
    any_store.delete_domain("birds")
    put_backbone(any_store, "a" * 64)
    assert any_store.get_backbone().manifest.fingerprint == "a" * 64
    assert any_store.verify() == []


def test_put_if_new_makes_the_first_version_only(any_store: AdapterStore) -> None:
    first = validated(make_domain_artifact(domain="imagenet", seed=0))
    assert any_store.put_if_new(first, activate=True) == 1
    revision = any_store.revision()
    assert any_store.put_if_new(validated(make_domain_artifact(domain="imagenet", seed=1))) is None
    assert any_store.revision() == revision  # nothing written
    any_store.delete_domain("imagenet")
    assert any_store.put_if_new(first) is None  # it had a version once: an operator deleted it
    assert any_store.list_domains() == []


def test_concurrent_threads_get_distinct_versions(any_store: AdapterStore) -> None:
    artifact = validated(make_domain_artifact(domain="birds"))
    results: list[int] = []
    barrier = threading.Barrier(4)

    def writer() -> None:
        barrier.wait()
        for _ in range(5):
            results.append(any_store.put(artifact, activate=True))

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(1, 21))
    assert any_store.describe("birds").versions == tuple(range(1, 21))
    assert write_count(any_store) == 20
    assert any_store.verify() == []


def test_put_refuses_an_unsafe_name_even_if_validation_was_bypassed(any_store: AdapterStore) -> None:
    good = validated(make_domain_artifact(domain="birds"))
    forged = ValidatedArtifact(
        good.manifest.model_copy(update={"domain": "../../escape"}), good.tensor_bytes, good.tensors
    )
    with pytest.raises(ArtifactInvalid):
        any_store.put(forged)
    assert any_store.list_domains() == []


# -- quotas ---------------------------------------------------------------------------------------------


def test_quota_on_domains(any_store: AdapterStore) -> None:
    limited = with_quotas(any_store, max_domains=2)
    put(limited, "birds")
    put(limited, "cars")
    put(limited, "birds", seed=1)  # a new version of a stored domain is not a new domain
    with pytest.raises(StoreQuotaExceeded, match="max_domains=2") as refused:
        put(limited, "trees")
    assert (refused.value.limit, refused.value.value) == ("max_domains", 2)
    assert limited.list_domains() == ["birds", "cars"]
    limited.delete_domain("cars")
    assert put(limited, "trees") == 1


def test_quota_on_versions_per_domain(any_store: AdapterStore) -> None:
    limited = with_quotas(any_store, max_versions_per_domain=2)
    put(limited, activate=True)
    put(limited, seed=1)
    with pytest.raises(StoreQuotaExceeded, match="max_versions_per_domain=2"):
        put(limited, seed=2)
    assert put(limited, "cars") == 1  # per domain
    limited.delete_version("birds", 2)
    assert put(limited, seed=2) == 3
    assert limited.describe("birds").versions == (1, 3)


def test_quota_on_store_bytes_counts_every_listed_object(any_store: AdapterStore) -> None:
    put_backbone(any_store)
    base = _used(any_store)
    assert base > 0  # the backbone counts
    put(any_store, "sizer")
    one_version = _used(any_store) - base  # manifest + tensors, as the store counts them
    any_store.delete_domain("sizer")
    assert _used(any_store) == base
    limited = with_quotas(any_store, max_store_bytes=base + 2 * one_version + one_version // 2)
    put(limited, seed=0)
    put(limited, seed=1)
    with pytest.raises(StoreQuotaExceeded, match="max_store_bytes") as refused:
        put(limited, seed=2)
    assert refused.value.limit == "max_store_bytes"
    assert limited.describe("birds").versions == (1, 2)
    limited.delete_version("birds", 1)
    assert put(limited, seed=2) == 3


def _used(store: AdapterStore) -> int:
    from adapters_store.index import StoreIndex

    if isinstance(store, LocalStore):
        return StoreIndex.model_validate_json((store.root / "index.json").read_bytes()).stored_bytes()
    assert isinstance(store, S3Store)
    return store._read_index()[0].stored_bytes()


# -- copying between backends ---------------------------------------------------------------------------


def _populate(store: AdapterStore) -> dict[tuple[str, int], bytes]:
    put_backbone(store)
    tensors = {}
    for seed in range(4):
        files = make_domain_artifact(domain="birds", seed=seed)
        tensors["birds", store.put(validated(files), activate=seed != 3)] = files.tensor_bytes
    store.delete_version("birds", 2)  # a gap in the numbers
    store.activate("birds", 4)  # active 4, rollback history (1, 3)
    files = make_domain_artifact(domain="cars", seed=9)
    tensors["cars", store.put(validated(files))] = files.tensor_bytes
    del tensors["birds", 2]
    return tensors


def _same_contents(a: AdapterStore, b: AdapterStore, tensors: dict[tuple[str, int], bytes]) -> None:
    assert a.describe_all() == b.describe_all()
    for (domain, version), data in tensors.items():
        assert a.get(domain, version).manifest == b.get(domain, version).manifest
        assert b.get(domain, version).read_tensor_bytes(verify=True) == data
    assert a.get_backbone().manifest == b.get_backbone().manifest
    assert a.get_backbone().read_tensor_bytes() == b.get_backbone().read_tensor_bytes()
    assert b.verify() == []


def test_copy_local_to_s3_to_local_round_trips(tmp_path: Path, s3_env: object) -> None:
    local = LocalStore(tmp_path / "a")
    tensors = _populate(local)
    s3 = S3Store.from_url(s3_url())
    report = copy_store(local, s3)
    assert (report.domains, report.versions) == (2, 4)
    _same_contents(local, s3, tensors)
    back = LocalStore(tmp_path / "b")
    copy_store(s3, back)
    _same_contents(local, back, tensors)
    # Histories survive: the rollback goes where it went in the original, and numbers are not reused.
    assert back.describe("birds").next_version == local.describe("birds").next_version == 5
    assert back.rollback("birds") == local.rollback("birds")
    assert put(back) == put(local) == 5


def test_copy_refuses_domains_the_destination_has(any_store: AdapterStore, tmp_path: Path) -> None:
    source = LocalStore(tmp_path / "src")
    put(source, activate=True)
    put(any_store, activate=True)
    before = any_store.describe_all()
    with pytest.raises(StoreConflict, match="exists"):
        copy_store(source, any_store)
    assert any_store.describe_all() == before
    assert any_store.verify() == []


def test_collect_garbage_removes_what_no_index_lists_and_nothing_else(any_store: AdapterStore) -> None:
    put_backbone(any_store)
    put(any_store, activate=True)
    put(any_store, "cars")
    any_store.delete_domain("cars")
    if isinstance(any_store, LocalStore):
        orphan = any_store.root / "domains" / "birds" / "deadbeef"
        orphan.mkdir()
        (orphan / "adapter.safetensors").write_bytes(b"half")
        (any_store.root / "tmp" / "stale").write_bytes(b"staged")
        expected = {"domains/birds/deadbeef", "tmp/stale"}
    else:
        assert isinstance(any_store, S3Store)
        key = "domains/birds/deadbeef/adapter.safetensors"
        any_store._client.put_object(Bucket=any_store.bucket, Key=any_store.prefix + key, Body=b"half")
        assert any_store.collect_garbage() == []  # an hour's guard: it may be a live writer's upload
        expected = {key}
    assert set(any_store.collect_garbage(min_age=timedelta(0))) == expected
    assert any_store.collect_garbage(min_age=timedelta(0)) == []
    assert any_store.verify() == [] and any_store.get("birds").read_tensor_bytes()
    assert any_store.get_backbone().read_tensor_bytes()


def test_a_put_whose_index_write_landed_keeps_its_objects_even_if_the_answer_is_lost(s3_env: object) -> None:
    url = s3_url()

    def lose_the_answer(step: str) -> None:
        if step == "index-written":
            raise ConnectionError("the index PUT landed, its response did not arrive")

    with pytest.raises(ConnectionError):
        S3Store.from_url(url, fault_hook=lose_the_answer).put(validated(make_domain_artifact(domain="birds")))
    store = S3Store.from_url(url)
    assert store.describe("birds").versions == (1,)
    assert store.get("birds", 1).read_tensor_bytes(verify=True)  # its objects were not discarded
    assert store.verify() == []


def test_re_applying_a_put_that_already_landed_lists_it_once() -> None:
    from adapters_store.index import StoreIndex, VersionRecord

    index, record = StoreIndex(), VersionRecord(key="k1", bytes=10)
    kwargs = {"fingerprint": "f" * 64, "activate": True, "quotas": StoreQuotas()}
    assert index.add_version("birds", record, **kwargs) == 1  # type: ignore[arg-type]
    assert index.add_version("birds", record, **kwargs) == 1  # type: ignore[arg-type]
    assert list(index.domains["birds"].versions) == [1] and index.next_version["birds"] == 2
