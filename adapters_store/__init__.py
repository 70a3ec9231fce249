"""Domain and backbone artifacts: format, validation of untrusted uploads, and the versioned store.

Knows a domain spec only as data (tensor name -> (shape, dtype)); never imports the model classes.

    validated = validate_domain_artifact(manifest_bytes, tensor_bytes, spec_for=..., fingerprint=...)
    version = store.put(validated, activate=True)
    stored = store.get("cifar100")          # active version: manifest + read_tensor_bytes()

``open_store("store")`` is a ``LocalStore`` (a directory), ``open_store("s3://bucket/prefix")`` an
``S3Store``; both implement ``AdapterStore`` with the same guarantees.
"""

from adapters_store.bundle import pack_bundle, unpack_bundle
from adapters_store.errors import (
    AdapterStoreError,
    ArtifactInvalid,
    BackboneNotFound,
    DomainNotFound,
    Problem,
    StoreBusy,
    StoreConflict,
    StoreCorrupt,
    StoreError,
    StoreQuotaExceeded,
    StoreSymlink,
    StoreUnavailable,
    VersionNotFound,
)
from adapters_store.index import DomainVersions, StoreQuotas
from adapters_store.limits import Limits
from adapters_store.local import LocalStore
from adapters_store.manifest import (
    BACKBONE_TENSORS_NAME,
    DOMAIN_TENSORS_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    AdapterSettings,
    ArchitectureConfig,
    BackboneManifest,
    DomainManifest,
    Preprocessing,
    Provenance,
    is_safe_domain_name,
    manifest_to_json,
    parse_backbone_manifest,
    parse_domain_manifest,
)
from adapters_store.open import open_store
from adapters_store.store import AdapterStore, StoredBackbone, StoredDomain
from adapters_store.validation import (
    DomainSpec,
    SpecFor,
    ValidatedArtifact,
    ValidatedBackbone,
    sha256_hex,
    validate_backbone_artifact,
    validate_domain_artifact,
)

__all__ = [
    "BACKBONE_TENSORS_NAME",
    "DOMAIN_TENSORS_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "AdapterSettings",
    "AdapterStore",
    "AdapterStoreError",
    "ArchitectureConfig",
    "ArtifactInvalid",
    "BackboneManifest",
    "BackboneNotFound",
    "DomainManifest",
    "DomainNotFound",
    "DomainSpec",
    "DomainVersions",
    "Limits",
    "LocalStore",
    "Preprocessing",
    "Problem",
    "Provenance",
    "SpecFor",
    "StoreBusy",
    "StoreConflict",
    "StoreCorrupt",
    "StoreError",
    "StoreQuotaExceeded",
    "StoreQuotas",
    "StoreSymlink",
    "StoreUnavailable",
    "StoredBackbone",
    "StoredDomain",
    "ValidatedArtifact",
    "ValidatedBackbone",
    "VersionNotFound",
    "is_safe_domain_name",
    "manifest_to_json",
    "open_store",
    "pack_bundle",
    "parse_backbone_manifest",
    "parse_domain_manifest",
    "sha256_hex",
    "unpack_bundle",
    "validate_backbone_artifact",
    "validate_domain_artifact",
]
