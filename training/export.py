"""Artifact files: a domain or backbone artifact as a directory or bundle on disk, read back and checked.

The conversions between networks and artifacts (``domain_artifact``, ``backbone_artifact``,
``validate_domain``...) are ``model_artifacts``'; this module writes their results to files and reads
files back. On disk an artifact is a directory of ``manifest.json`` + ``adapter.safetensors`` (domain) or
``backbone.safetensors`` (backbone); a domain artifact can also be written as a single-file bundle (the
store's tar form, what ``POST /domains`` accepts).
"""

from __future__ import annotations

from pathlib import Path

from adapters_store.bundle import pack_bundle
from adapters_store.files import read_backbone_dir, read_domain_files
from adapters_store.manifest import (
    BACKBONE_TENSORS_NAME,
    DOMAIN_TENSORS_NAME,
    MANIFEST_NAME,
    BackboneManifest,
    DomainManifest,
    manifest_to_json,
    parse_domain_manifest,
)
from adapters_store.validation import sha256_hex
from model_artifacts import (
    BackboneArtifact,
    BackboneRefused,
    DomainArtifact,
    backbone_network,
    load_validated_domain,
    validate_domain,
)
from residual_adapters import MultiDomainNet

# -- files ----------------------------------------------------------------------------------------------


def _write_dir(
    manifest: DomainManifest | BackboneManifest, tensor_bytes: bytes, tensors_name: str, path: Path
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / tensors_name).write_bytes(tensor_bytes)
    (path / MANIFEST_NAME).write_bytes(manifest_to_json(manifest))  # last: a directory with it is complete
    return path


def write_domain_dir(artifact: DomainArtifact, path: Path) -> Path:
    """Write ``manifest.json`` + ``adapter.safetensors`` into ``path`` (created)."""
    return _write_dir(*artifact, DOMAIN_TENSORS_NAME, path)


def write_backbone_dir(artifact: BackboneArtifact, path: Path) -> Path:
    """Write ``manifest.json`` + ``backbone.safetensors`` into ``path`` (created)."""
    return _write_dir(*artifact, BACKBONE_TENSORS_NAME, path)


def write_bundle(artifact: DomainArtifact, path: Path) -> Path:
    """Write the single-file (tar) form of a domain artifact."""
    manifest, tensor_bytes = artifact
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pack_bundle(manifest_to_json(manifest), tensor_bytes))
    return path


def read_domain(path: Path) -> DomainArtifact:
    """A domain artifact directory or bundle, schema- and checksum-checked (not against a backbone)."""
    manifest_bytes, tensor_bytes = read_domain_files(path)
    manifest = parse_domain_manifest(manifest_bytes)
    if sha256_hex(tensor_bytes) != manifest.sha256:
        raise ValueError(f"{path}: sha256 of {DOMAIN_TENSORS_NAME} does not match its manifest")
    return manifest, tensor_bytes


def read_backbone_network(path: Path) -> MultiDomainNet:
    """The network of a backbone artifact directory, validated and its fingerprint checked."""
    validated = read_backbone_dir(path)
    try:
        return backbone_network(validated.manifest, validated.tensors)
    except BackboneRefused as exc:
        raise ValueError(f"{path}: {exc}") from None


def load_domain_into(net: MultiDomainNet, path: Path, name: str | None = None) -> DomainManifest:
    """Validate a domain artifact against ``net`` and add it as a trainable domain (``name`` or its own)."""
    manifest_bytes, tensor_bytes = read_domain_files(path)
    validated = validate_domain(manifest_bytes, tensor_bytes, net)
    load_validated_domain(net, validated, name)
    return validated.manifest
