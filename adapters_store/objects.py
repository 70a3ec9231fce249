"""The objects one version (or the backbone) is stored as, the same in every backend.

A version is two immutable objects, ``manifest.json`` and ``adapter.safetensors``, under a unique key.
The stored manifest says ``version: 0``: the number is assigned when the index lists the key (at
commit, see ``adapters_store.index``), and ``stored_manifest`` puts it back when the version is read.
"""

from __future__ import annotations

from adapters_store.errors import ArtifactInvalid, Problem, StoreCorrupt
from adapters_store.manifest import (
    BACKBONE_TENSORS_NAME,
    DOMAIN_TENSORS_NAME,
    MANIFEST_NAME,
    DomainManifest,
    is_safe_domain_name,
    manifest_to_json,
    parse_domain_manifest,
)
from adapters_store.validation import ValidatedArtifact, ValidatedBackbone


def _domain_files(manifest: DomainManifest, tensor_bytes: bytes) -> dict[str, bytes]:
    # Tensors first: a reader that finds the manifest finds a complete version (the order only matters
    # for a backend without atomic directories, and costs nothing elsewhere).
    return {
        DOMAIN_TENSORS_NAME: tensor_bytes,
        MANIFEST_NAME: manifest_to_json(manifest.model_copy(update={"version": 0})),
    }


def domain_objects(artifact: ValidatedArtifact) -> tuple[str, dict[str, bytes]]:
    """``(domain, {object name: bytes})`` for a new version of ``artifact``."""
    domain = artifact.manifest.domain
    # Validation guarantees this, but model_copy() can bypass it and the name becomes a key or a path.
    if not is_safe_domain_name(domain):
        raise ArtifactInvalid([Problem("manifest.domain", f"unsafe domain name {domain!r}", "schema")])
    return domain, _domain_files(artifact.manifest, artifact.tensor_bytes)


def restored_objects(
    domain: str, version: int, manifest: DomainManifest, tensor_bytes: bytes
) -> dict[str, bytes]:
    """The objects of a version copied from another store (``restore_domain``)."""
    if manifest.domain != domain or not is_safe_domain_name(domain):
        raise StoreCorrupt(f"the source's {domain} v{version} names domain {manifest.domain!r}")
    return _domain_files(manifest, tensor_bytes)


def backbone_objects(artifact: ValidatedBackbone) -> dict[str, bytes]:
    return {BACKBONE_TENSORS_NAME: artifact.tensor_bytes, MANIFEST_NAME: manifest_to_json(artifact.manifest)}


def stored_manifest(data: bytes, domain: str, version: int, where: str) -> DomainManifest:
    """Parse a stored version's manifest, check it belongs to ``domain`` and give it its number."""
    try:
        manifest = parse_domain_manifest(data)
    except ArtifactInvalid as exc:
        raise StoreCorrupt(f"{where}/{MANIFEST_NAME}: {exc}") from None
    if manifest.domain != domain:
        raise StoreCorrupt(f"{where}/{MANIFEST_NAME} names domain {manifest.domain!r}, listed as {domain!r}")
    return manifest.model_copy(update={"version": version})
