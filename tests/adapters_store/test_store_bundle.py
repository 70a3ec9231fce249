"""Bundles: an uncompressed tar of exactly manifest.json + adapter.safetensors, read in memory."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from adapters_store import ArtifactInvalid, Limits, pack_bundle, unpack_bundle
from adapters_store.testing import ArtifactFiles


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def reg(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def link(name: str, kind: bytes, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def codes(data: bytes, limits: Limits = Limits()) -> set[str]:
    with pytest.raises(ArtifactInvalid) as exc:
        unpack_bundle(data, limits=limits)
    return exc.value.codes()


def test_round_trip(artifact: ArtifactFiles) -> None:
    data = pack_bundle(artifact.manifest_bytes, artifact.tensor_bytes)
    assert unpack_bundle(data) == (artifact.manifest_bytes, artifact.tensor_bytes)


def test_packing_is_deterministic(artifact: ArtifactFiles) -> None:
    assert artifact.bundle() == artifact.bundle()


def test_members_in_either_order() -> None:
    data = tar_of((reg("adapter.safetensors"), b"T"), (reg("manifest.json"), b"M"))
    assert unpack_bundle(data) == (b"M", b"T")


def test_symlink_refused() -> None:
    data = tar_of(
        (reg("manifest.json"), b"M"), (link("adapter.safetensors", tarfile.SYMTYPE, "/etc/passwd"), None)
    )
    assert codes(data) == {"bundle_members"}


def test_hardlink_refused() -> None:
    data = tar_of(
        (reg("manifest.json"), b"M"), (link("adapter.safetensors", tarfile.LNKTYPE, "manifest.json"), None)
    )
    assert "bundle_members" in codes(data)


def test_directory_member_refused() -> None:
    info = tarfile.TarInfo("adapter.safetensors")
    info.type = tarfile.DIRTYPE
    assert "bundle_members" in codes(tar_of((reg("manifest.json"), b"M"), (info, None)))


def test_other_member_refused() -> None:
    data = tar_of((reg("manifest.json"), b"M"), (reg("../adapter.safetensors"), b"T"))
    assert codes(data) == {"bundle_members"}


def test_prefixed_names_refused() -> None:
    data = tar_of((reg("./manifest.json"), b"M"), (reg("adapter.safetensors"), b"T"))
    assert codes(data) == {"bundle_members"}


def test_third_member_refused() -> None:
    data = tar_of((reg("manifest.json"), b"M"), (reg("adapter.safetensors"), b"T"), (reg("x"), b"X"))
    assert codes(data) == {"bundle_members"}


def test_duplicated_member_refused() -> None:
    data = tar_of((reg("manifest.json"), b"M"), (reg("manifest.json"), b"N"))
    with pytest.raises(ArtifactInvalid) as exc:
        unpack_bundle(data)
    assert any("duplicated" in p.message for p in exc.value.problems)


def test_missing_member_refused() -> None:
    assert codes(tar_of((reg("manifest.json"), b"M"))) == {"bundle_members"}


def test_oversized_member_refused() -> None:
    data = tar_of((reg("manifest.json"), b"M" * 100), (reg("adapter.safetensors"), b"T"))
    assert codes(data, Limits(max_manifest_bytes=50)) == {"too_large"}


def test_oversized_bundle_refused() -> None:
    data = pack_bundle(b"M", b"T" * 100_000)
    with pytest.raises(ArtifactInvalid) as exc:
        unpack_bundle(data, limits=Limits(max_tensor_bytes=10, max_manifest_bytes=10))
    assert [(p.field, p.code) for p in exc.value.problems] == [("bundle", "too_large")]


def test_compressed_bundle_refused(artifact: ArtifactFiles) -> None:
    assert codes(gzip.compress(artifact.bundle())) == {"bundle_format"}


def test_garbage_refused() -> None:
    assert codes(b"\x00" * 10 + b"not a tar" * 100) == {"bundle_format"}
    assert codes(b"") == {"bundle_format"}


def test_truncated_bundle_refused(artifact: ArtifactFiles) -> None:
    assert "bundle_format" in codes(artifact.bundle()[:1000])
