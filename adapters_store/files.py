"""Artifacts on disk, read with size limits: a domain artifact directory or bundle, a backbone directory.

A file larger than its limit is refused before it is read; a bundle that is really a pickle (torch.save)
is refused before it is unpacked. Refusals are ``ArtifactInvalid`` naming the file.
"""

from __future__ import annotations

from pathlib import Path

from adapters_store.bundle import unpack_bundle
from adapters_store.errors import ArtifactInvalid, Problem
from adapters_store.limits import Limits
from adapters_store.manifest import BACKBONE_TENSORS_NAME, DOMAIN_TENSORS_NAME, MANIFEST_NAME
from adapters_store.safetensors_check import looks_like_pickle
from adapters_store.validation import ValidatedBackbone, validate_backbone_artifact


def read_limited(path: Path, field: str, limit: int) -> bytes:
    """The bytes of ``path``, refused (as problem ``field``) when it cannot be read or exceeds ``limit``."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ArtifactInvalid([Problem(field, f"cannot read {path}: {exc.strerror}", "io")]) from None
    if size > limit:
        raise ArtifactInvalid(
            [Problem(field, f"{path}: {size} bytes exceed the limit of {limit}", "too_large")]
        )
    return path.read_bytes()


def read_domain_files(path: Path, limits: Limits = Limits()) -> tuple[bytes, bytes]:
    """``(manifest_bytes, tensor_bytes)`` of a domain artifact directory or bundle file (not validated)."""
    if path.is_dir():
        manifest = read_limited(path / MANIFEST_NAME, "manifest", limits.max_manifest_bytes)
        return manifest, read_limited(path / DOMAIN_TENSORS_NAME, "tensors", limits.max_tensor_bytes)
    data = read_limited(path, "bundle", limits.max_bundle_bytes)
    pickled = looks_like_pickle(data, path.name)
    if pickled is not None:
        raise ArtifactInvalid([pickled])
    return unpack_bundle(data, limits=limits)


def read_backbone_dir(path: Path, limits: Limits = Limits()) -> ValidatedBackbone:
    """A backbone artifact directory, validated (schema, checksum, finite values); problems are named
    ``backbone.*``."""
    if not path.is_dir():
        raise ArtifactInvalid([Problem("backbone", f"{path} is not a backbone artifact directory", "io")])
    manifest = read_limited(path / MANIFEST_NAME, "backbone.manifest", limits.max_manifest_bytes)
    tensors = read_limited(path / BACKBONE_TENSORS_NAME, "backbone.tensors", limits.max_backbone_bytes)
    try:
        return validate_backbone_artifact(manifest, tensors, limits=limits)
    except ArtifactInvalid as exc:
        raise ArtifactInvalid(
            [Problem(f"backbone.{p.field}", p.message, p.code) for p in exc.problems]
        ) from None
