"""LocalStore: versions, aliases, deletes, revision, backbone, orphans, corruption, locking."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from adapters_store import (
    AdapterStore,
    ArtifactInvalid,
    BackboneNotFound,
    DomainNotFound,
    LocalStore,
    StoreBusy,
    StoreConflict,
    StoreCorrupt,
    StoreSymlink,
    ValidatedArtifact,
    VersionNotFound,
    nofollow,
    validate_backbone_artifact,
)
from adapters_store.testing import ArtifactFiles, make_backbone_artifact, make_domain_artifact, validated


def put(store: LocalStore, domain: str = "birds", *, seed: int = 0, activate: bool = False) -> int:
    return store.put(validated(make_domain_artifact(domain=domain, seed=seed)), activate=activate)


def test_is_an_adapter_store(store: LocalStore) -> None:
    assert isinstance(store, AdapterStore)


def test_put_get_round_trip(store: LocalStore, artifact: ArtifactFiles) -> None:
    version = store.put(validated(artifact), activate=True)
    assert version == 1
    stored = store.get("birds")
    assert stored.version == 1 and stored.domain == "birds"
    assert stored.manifest == artifact.manifest.model_copy(update={"version": 1})
    assert stored.read_tensor_bytes() == artifact.tensor_bytes
    loaded = safetensors.numpy.load_file(stored.tensor_path)  # the server's mmap path
    for name, array in safetensors.numpy.load(artifact.tensor_bytes).items():
        np.testing.assert_array_equal(loaded[name], array)


def test_fp16_round_trip(store: LocalStore) -> None:
    files = make_domain_artifact(dtype="float16")
    store.put(validated(files), activate=True)
    assert store.get("example").manifest.dtype == "float16"
    assert store.get("example").read_tensor_bytes() == files.tensor_bytes


def test_versions_increase_and_are_never_reused(store: LocalStore) -> None:
    assert [put(store, seed=i) for i in range(3)] == [1, 2, 3]
    store.delete_version("birds", 3)
    assert put(store) == 4
    store.delete_domain("birds")
    assert store.list_domains() == []
    assert put(store) == 5
    assert store.describe("birds").versions == (5,)


def test_versions_are_per_domain(store: LocalStore) -> None:
    assert (put(store, "birds"), put(store, "cars"), put(store, "birds")) == (1, 1, 2)
    assert store.list_domains() == ["birds", "cars"]


def test_new_version_is_inactive_unless_asked(store: LocalStore) -> None:
    put(store)
    with pytest.raises(VersionNotFound):
        store.get("birds")
    assert store.get("birds", 1).version == 1
    assert store.describe("birds").active is None
    put(store, activate=True)
    assert store.get("birds").version == 2


def test_activate_and_rollback(store: LocalStore) -> None:
    for i in range(3):
        put(store, seed=i)
    store.activate("birds", 1)
    store.activate("birds", 3)
    store.activate("birds", 2)
    assert store.describe("birds").previous == (1, 3)
    assert store.rollback("birds") == 3
    assert store.get("birds").version == 3
    assert store.rollback("birds") == 1
    with pytest.raises(StoreConflict):
        store.rollback("birds")
    assert store.get("birds").version == 1


def test_rollback_skips_deleted_versions(store: LocalStore) -> None:
    for i in range(3):
        put(store, seed=i, activate=True)
    store.delete_version("birds", 2)
    assert store.rollback("birds") == 1


def test_activate_unknown_version(store: LocalStore) -> None:
    put(store)
    with pytest.raises(VersionNotFound):
        store.activate("birds", 7)


def test_deleting_the_active_version_is_refused(store: LocalStore) -> None:
    put(store, activate=True)
    put(store)
    with pytest.raises(StoreConflict):
        store.delete_version("birds", 1)
    assert store.get("birds").version == 1
    store.delete_version("birds", 2)
    assert not (store.root / "domains" / "birds" / "v2").exists()
    with pytest.raises(VersionNotFound):
        store.get("birds", 2)
    with pytest.raises(VersionNotFound):
        store.delete_version("birds", 2)


def test_delete_domain_removes_files(store: LocalStore) -> None:
    put(store, activate=True)
    store.delete_domain("birds")
    assert not (store.root / "domains" / "birds").exists()
    with pytest.raises(DomainNotFound):
        store.get("birds")
    with pytest.raises(DomainNotFound):
        store.delete_domain("birds")


@pytest.mark.parametrize("name", ["nope", "../birds", "birds/v1", "", "BIRDS"])
def test_unknown_or_unsafe_domains_are_not_found(store: LocalStore, name: str) -> None:
    put(store, activate=True)
    for call in (lambda: store.get(name), lambda: store.describe(name), lambda: store.activate(name, 1)):
        with pytest.raises(DomainNotFound):
            call()


def test_revision_changes_on_every_write_only(store: LocalStore) -> None:
    assert store.revision() == 0
    put(store)
    put(store, activate=True)
    assert store.revision() == 2
    store.get("birds")
    store.describe("birds")
    store.list_domains()
    store.activate("birds", 2)  # already active: nothing written
    assert store.revision() == 2
    store.activate("birds", 1)
    store.rollback("birds")
    store.delete_version("birds", 1)
    store.delete_domain("birds")
    assert store.revision() == 6
    assert LocalStore(store.root).revision() == 6


def test_backbone_round_trip(store: LocalStore) -> None:
    with pytest.raises(BackboneNotFound):
        store.get_backbone()
    files = make_backbone_artifact()
    store.put_backbone(validate_backbone_artifact(files.manifest_bytes, files.tensor_bytes))
    stored = store.get_backbone()
    assert stored.manifest == files.manifest
    assert stored.read_tensor_bytes() == files.tensor_bytes
    revision = store.revision()
    store.put_backbone(validate_backbone_artifact(files.manifest_bytes, files.tensor_bytes))
    assert store.revision() == revision  # same fingerprint: nothing to do


def test_domains_must_match_the_stored_backbone(store: LocalStore) -> None:
    files = make_backbone_artifact()
    store.put_backbone(validate_backbone_artifact(files.manifest_bytes, files.tensor_bytes))
    put(store, activate=True)
    other = make_domain_artifact(domain="cars", fingerprint="a" * 64)
    with pytest.raises(StoreConflict):
        store.put(validated(other, fingerprint="a" * 64))
    replacement = make_backbone_artifact(fingerprint="a" * 64)
    with pytest.raises(StoreConflict):
        store.put_backbone(validate_backbone_artifact(replacement.manifest_bytes, replacement.tensor_bytes))
    store.delete_domain("birds")
    store.put_backbone(validate_backbone_artifact(replacement.manifest_bytes, replacement.tensor_bytes))
    assert store.get_backbone().manifest.fingerprint == "a" * 64
    assert [p.name for p in (store.root / "backbones").iterdir()] == ["a" * 64]


def test_orphans_of_interrupted_writes_are_swept_and_never_listed(store: LocalStore) -> None:
    put(store, activate=True)
    orphan = store.root / "domains" / "birds" / "v2"
    orphan.mkdir()
    (orphan / "adapter.safetensors").write_bytes(b"half")
    (store.root / "tmp" / "junk").mkdir()
    assert store.describe("birds").versions == (1,)
    with pytest.raises(VersionNotFound):
        store.get("birds", 2)
    assert put(store) == 2  # the unlisted number was never published, so it is free
    assert store.get("birds", 2).read_tensor_bytes()  # the real v2, not the orphan
    assert list((store.root / "tmp").iterdir()) == []
    assert store.verify() == []


def test_corrupt_index_is_reported(store: LocalStore) -> None:
    put(store)
    (store.root / "index.json").write_text("{not json")
    with pytest.raises(StoreCorrupt):
        store.list_domains()
    with pytest.raises(StoreCorrupt):
        store.revision()


def test_tampered_tensor_file_is_detected(store: LocalStore) -> None:
    put(store, activate=True)
    stored = store.get("birds")
    data = bytearray(stored.tensor_path.read_bytes())
    data[-1] ^= 0xFF
    stored.tensor_path.write_bytes(bytes(data))
    with pytest.raises(StoreCorrupt):
        stored.read_tensor_bytes(verify=True)
    assert [p.field for p in store.verify()] == ["domains/birds/v1"]


def test_a_held_lock_makes_writers_busy(tmp_path: Path) -> None:
    holder = LocalStore(tmp_path / "s")
    put(holder)
    waiter = LocalStore(tmp_path / "s", lock_timeout=0.01)
    with holder._writing():
        with pytest.raises(StoreBusy):
            put(waiter)
        assert waiter.get("birds", 1).version == 1  # readers take no lock
    put(waiter)


def test_concurrent_threads_get_distinct_versions(store: LocalStore) -> None:
    artifact = validated(make_domain_artifact(domain="birds"))
    results: list[int] = []
    barrier = threading.Barrier(4)

    def writer() -> None:
        barrier.wait()
        for _ in range(5):
            results.append(store.put(artifact, activate=True))

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(1, 21))
    assert store.describe("birds").versions == tuple(range(1, 21))
    assert store.revision() == 20
    assert store.verify() == []


def test_put_refuses_an_unsafe_name_even_if_validation_was_bypassed(store: LocalStore) -> None:
    good = validated(make_domain_artifact(domain="birds"))
    forged = ValidatedArtifact(
        good.manifest.model_copy(update={"domain": "../../escape"}), good.tensor_bytes, good.tensors
    )
    with pytest.raises(ArtifactInvalid):
        store.put(forged)
    assert not (store.root.parent / "escape").exists()
    assert store.list_domains() == []


# -- symlinks: the store never follows one it did not create ------------------------------------------


def _victim(tmp_path: Path) -> Path:
    """A directory outside the store with files that must survive whatever the store does."""
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "keep.txt").write_text("precious")
    (victim / "sub" / "deep.txt").write_text("precious too")
    return victim


def _victim_intact(victim: Path) -> bool:
    return (victim / "keep.txt").read_text() == "precious" and (victim / "sub" / "deep.txt").exists()


def _replace_with_link(path: Path, target: Path) -> None:
    nofollow.remove_tree(path.parent, path.name)
    path.symlink_to(target, target_is_directory=True)


def test_a_symlinked_tmp_is_refused_and_its_target_survives_an_upload(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    put(store, activate=True)
    victim = _victim(tmp_path)
    _replace_with_link(store.root / "tmp", victim)
    with pytest.raises(StoreSymlink, match="tmp is a symbolic link"):
        put(store)  # the sweep of tmp/ used to delete the victim's files here
    assert _victim_intact(victim)
    with pytest.raises(StoreSymlink):
        LocalStore(store.root)  # refused on opening too
    assert store.describe("birds").versions == (1,)


def test_a_symlinked_domain_directory_is_refused_on_every_write(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    put(store, activate=True)
    put(store)
    victim = _victim(tmp_path)
    _replace_with_link(store.root / "domains" / "birds", victim)
    for write in (
        lambda: put(store),
        lambda: store.delete_version("birds", 2),
        lambda: store.delete_domain("birds"),
        lambda: store.activate("birds", 2),
    ):
        with pytest.raises(StoreSymlink, match="birds is a symbolic link"):
            write()
    with pytest.raises(StoreSymlink):
        store.get("birds")  # nor read through it
    assert _victim_intact(victim)
    assert store.describe("birds").versions == (1, 2)  # nothing was committed either


def test_links_inside_tmp_are_removed_without_touching_their_targets(
    store: LocalStore, tmp_path: Path
) -> None:
    put(store)
    victim = _victim(tmp_path)
    (store.root / "tmp" / "dir-link").symlink_to(victim, target_is_directory=True)
    (store.root / "tmp" / "file-link").symlink_to(victim / "keep.txt")
    put(store)
    assert nofollow.list_dir(store.root, "tmp") == []
    assert _victim_intact(victim)


def test_a_symlinked_version_file_is_not_read(store: LocalStore, tmp_path: Path) -> None:
    put(store, activate=True)
    outside = tmp_path / "outside.json"
    manifest = store.root / "domains" / "birds" / "v1" / "manifest.json"
    outside.write_bytes(manifest.read_bytes())
    manifest.unlink()
    manifest.symlink_to(outside)
    with pytest.raises(StoreSymlink):
        store.get("birds")
    assert [p.field for p in store.verify()] == ["domains/birds/v1"]


def test_the_root_itself_may_be_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "volume").mkdir()
    (tmp_path / "mounted").symlink_to(tmp_path / "volume", target_is_directory=True)
    store = LocalStore(tmp_path / "mounted")
    put(store, activate=True)
    store.delete_domain("birds")
    put(store, activate=True)
    assert LocalStore(tmp_path / "mounted").get("birds").version == 2
    assert (tmp_path / "volume" / "index.json").is_file()
    assert store.verify() == []
