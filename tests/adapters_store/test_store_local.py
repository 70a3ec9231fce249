"""LocalStore only: files on disk, orphans, corruption, locking, symlinks, stores of format 1.

The backend-independent contract runs on both backends in test_store_contract.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters_store import (
    LocalStore,
    StoreBusy,
    StoreCorrupt,
    StoreSymlink,
    VersionNotFound,
    nofollow,
)
from adapters_store.index import StoreIndex
from adapters_store.manifest import manifest_to_json
from adapters_store.testing import make_backbone_artifact, make_domain_artifact, validated


def put(store: LocalStore, domain: str = "birds", *, seed: int = 0, activate: bool = False) -> int:
    return store.put(validated(make_domain_artifact(domain=domain, seed=seed)), activate=activate)


def _index(store: LocalStore) -> StoreIndex:
    return StoreIndex.model_validate_json((store.root / "index.json").read_bytes())


def _version_dir(store: LocalStore, domain: str, version: int) -> Path:
    return store.root / "domains" / domain / _index(store).domains[domain].versions[version].key


def test_versions_are_directories_under_unique_keys_and_deletes_remove_them(store: LocalStore) -> None:
    put(store, activate=True)
    put(store)
    v1, v2 = _version_dir(store, "birds", 1), _version_dir(store, "birds", 2)
    assert v1 != v2 and sorted(p.name for p in v1.iterdir()) == ["adapter.safetensors", "manifest.json"]
    # The number lives in the index only: the stored manifest says 0 and get() fills it in.
    assert json.loads((v2 / "manifest.json").read_bytes())["version"] == 0
    assert store.get("birds", 2).manifest.version == 2
    store.delete_version("birds", 2)
    assert not v2.exists() and v1.exists()
    store.delete_domain("birds")
    assert not (store.root / "domains" / "birds").exists()


def test_the_revision_is_a_counter_that_survives_reopening(store: LocalStore) -> None:
    assert store.revision() == "0"
    put(store)
    put(store, activate=True)
    assert store.revision() == "2" == LocalStore(store.root).revision()


def test_orphans_of_interrupted_writes_are_swept_and_never_listed(store: LocalStore) -> None:
    put(store, activate=True)
    orphan = store.root / "domains" / "birds" / "0123abcd"
    orphan.mkdir()
    (orphan / "adapter.safetensors").write_bytes(b"half")
    (store.root / "tmp" / "junk").mkdir()
    assert store.describe("birds").versions == (1,)
    with pytest.raises(VersionNotFound):
        store.get("birds", 2)
    assert put(store) == 2
    assert store.get("birds", 2).read_tensor_bytes()  # the real v2, not the orphan
    assert list((store.root / "tmp").iterdir()) == []
    assert sorted(p.name for p in (store.root / "domains" / "birds").iterdir()) == sorted(
        r.key for r in _index(store).domains["birds"].versions.values()
    )
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
    path = _version_dir(store, "birds", 1) / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreCorrupt):
        store.get("birds").read_tensor_bytes(verify=True)
    assert [p.field for p in store.verify()] == ["domains/birds/v1"]


def test_a_store_of_format_1_is_read_and_upgraded_by_the_next_write(tmp_path: Path) -> None:
    """A store written before unique keys: versions in v<N> directories, the backbone under its fingerprint."""
    root = tmp_path / "old"
    files = make_domain_artifact(domain="birds", seed=3)
    backbone = make_backbone_artifact()
    vdir = root / "domains" / "birds" / "v1"
    vdir.mkdir(parents=True)
    (vdir / "adapter.safetensors").write_bytes(files.tensor_bytes)
    (vdir / "manifest.json").write_bytes(manifest_to_json(files.manifest.model_copy(update={"version": 1})))
    bdir = root / "backbones" / backbone.manifest.fingerprint
    bdir.mkdir(parents=True)
    (bdir / "backbone.safetensors").write_bytes(backbone.tensor_bytes)
    (bdir / "manifest.json").write_bytes(backbone.manifest_bytes)
    old_index = {
        "revision": 5,
        "format": 1,
        "backbone": backbone.manifest.fingerprint,
        "next_version": {"birds": 2},
        "domains": {"birds": {"versions": [1], "active": 1, "previous": []}},
    }
    (root / "index.json").write_text(json.dumps(old_index))
    store = LocalStore(root)
    assert store.revision() == "5"
    assert store.get("birds").read_tensor_bytes() == files.tensor_bytes
    assert store.get_backbone().read_tensor_bytes() == backbone.tensor_bytes
    assert store.verify() == []
    assert put(store, seed=4, activate=True) == 2
    assert _index(store).format == 2 and store.rollback("birds") == 1
    assert store.get("birds").read_tensor_bytes() == files.tensor_bytes  # still read from v1/


def test_a_held_lock_makes_writers_busy(tmp_path: Path) -> None:
    holder = LocalStore(tmp_path / "s")
    put(holder)
    waiter = LocalStore(tmp_path / "s", lock_timeout=0.01)
    with holder._writing():
        with pytest.raises(StoreBusy):
            put(waiter)
        assert waiter.get("birds", 1).version == 1  # readers take no lock
    put(waiter)


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
    manifest = _version_dir(store, "birds", 1) / "manifest.json"
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
