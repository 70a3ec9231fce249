"""Fabricated artifacts for tests (this package's, the server's, the trainer's).

No model classes are needed: a *spec* is plain data (tensor name -> (shape, dtype)), and these
helpers turn one into valid artifact bytes that tests then break in exactly one way::

    from adapters_store.testing import EXAMPLE_FINGERPRINT, make_domain_artifact, spec_for_labels
    files = make_domain_artifact(domain="birds", labels=["crow", "wren", "owl"])
    validated = validate_domain_artifact(
        files.manifest_bytes, files.tensor_bytes, spec_for=spec_for_labels, fingerprint=EXAMPLE_FINGERPRINT
    )
    store.put(validated, activate=True)

``example_spec`` mimics a residual-adapter domain (1x1 adapters, domain BN, a head sized by the label
count); ``spec_for_labels`` is the matching ``spec_for`` callable for ``validate_domain_artifact``.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from adapters_store.bundle import pack_bundle
from adapters_store.manifest import (
    BACKBONE_TENSORS_NAME,
    DOMAIN_TENSORS_NAME,
    MANIFEST_NAME,
    AdapterSettings,
    ArchitectureConfig,
    BackboneManifest,
    DomainManifest,
    Preprocessing,
    Provenance,
    manifest_to_json,
)
from adapters_store.validation import DomainSpec, ValidatedArtifact, sha256_hex, validate_domain_artifact

EXAMPLE_FINGERPRINT = hashlib.sha256(b"adapters_store.testing example backbone").hexdigest()
"""The fingerprint every fabricated artifact names unless told otherwise."""

HEAD_WEIGHT = "head.weight"


def example_spec(
    num_classes: int = 3, *, channels: Sequence[int] = (3, 4, 8)
) -> dict[str, tuple[tuple[int, ...], str]]:
    """A small domain spec: per conv ``i`` (``channels[i] -> channels[i+1]``) a 1x1 adapter and a domain
    BN, then a final BN and a linear head with ``num_classes`` outputs. Dtypes are ``float32`` (meaning
    "the manifest's dtype") except BN's ``num_batches_tracked`` (``int64``)."""
    spec: dict[str, tuple[tuple[int, ...], str]] = {}
    for i, (c_in, c_out) in enumerate(itertools.pairwise(channels)):
        spec[f"layers.{i}.adapter.weight"] = ((c_out, c_in, 1, 1), "float32")
        for p in ("weight", "bias", "running_mean", "running_var"):
            spec[f"layers.{i}.bn.{p}"] = ((c_out,), "float32")
        spec[f"layers.{i}.bn.num_batches_tracked"] = ((), "int64")
    spec[HEAD_WEIGHT] = ((num_classes, channels[-1]), "float32")
    spec["head.bias"] = ((num_classes,), "float32")
    return spec


def spec_for_labels(manifest: DomainManifest) -> DomainSpec:
    """``spec_for`` matching ``example_spec``: the head is sized by the manifest's label count."""
    return example_spec(len(manifest.labels))


def make_tensors(
    spec: Mapping[str, tuple[tuple[int, ...], str]], *, dtype: str = "float32", seed: int = 0
) -> dict[str, np.ndarray]:
    """Random finite tensors for ``spec``; ``float32`` entries take ``dtype`` (like validation does)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, (shape, spec_dtype) in spec.items():
        want = dtype if spec_dtype in ("float32", "float16") else spec_dtype
        if np.issubdtype(np.dtype(want), np.floating):
            values = rng.standard_normal(shape)
            # A variance is never negative: validation refuses one that is.
            out[name] = (np.abs(values) if name.endswith("running_var") else values).astype(want)
        else:
            out[name] = np.zeros(shape, dtype=want)
    return out


def default_preprocessing() -> Preprocessing:
    return Preprocessing(
        input_size=64, resize=72, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], channels="rgb"
    )


def default_provenance() -> Provenance:
    return Provenance(
        dataset="synthetic", epochs=1, val_accuracy=0.5, created_at=datetime(2024, 1, 1, tzinfo=UTC)
    )


@dataclass(frozen=True)
class ArtifactFiles:
    """The two files of an artifact as bytes, plus the manifest they were made from."""

    manifest: DomainManifest | BackboneManifest
    manifest_bytes: bytes
    tensor_bytes: bytes
    tensor_name: str = DOMAIN_TENSORS_NAME

    def bundle(self) -> bytes:
        """The single-file upload form (domain artifacts)."""
        return pack_bundle(self.manifest_bytes, self.tensor_bytes)

    def write_dir(self, path: Path) -> Path:
        """Write ``manifest.json`` + the tensor file into ``path`` (created) and return it."""
        path.mkdir(parents=True, exist_ok=True)
        (path / MANIFEST_NAME).write_bytes(self.manifest_bytes)
        (path / self.tensor_name).write_bytes(self.tensor_bytes)
        return path


def make_domain_artifact(
    spec: Mapping[str, tuple[tuple[int, ...], str]] | None = None,
    *,
    domain: str = "example",
    labels: Sequence[str] | None = None,
    fingerprint: str = EXAMPLE_FINGERPRINT,
    dtype: str = "float32",
    seed: int = 0,
    tensors: Mapping[str, np.ndarray] | None = None,
    adapter: AdapterSettings | None = None,
    **manifest_fields: Any,
) -> ArtifactFiles:
    """A valid domain artifact for ``spec`` (default ``example_spec(len(labels))``).

    ``tensors`` replaces the generated tensors (to test bad ones); the manifest's sha256 is computed
    from the bytes actually written unless ``sha256=`` is given. Other ``manifest_fields`` override
    manifest fields *without validation* (``domain="../x"`` yields a manifest that will be refused).
    """
    if labels is None:
        n = spec[HEAD_WEIGHT][0][0] if spec is not None and HEAD_WEIGHT in spec else 3
        labels = [f"class_{i}" for i in range(n)]
    if spec is None:
        spec = example_spec(len(labels))
    if tensors is None:
        tensors = make_tensors(spec, dtype=dtype, seed=seed)
    tensor_bytes = safetensors.numpy.save(dict(tensors))
    manifest = DomainManifest(
        domain="placeholder",
        labels=["placeholder"],
        backbone="tiny",
        backbone_fingerprint=fingerprint,
        adapter=adapter or AdapterSettings(kind="parallel"),
        preprocessing=default_preprocessing(),
        provenance=default_provenance(),
        sha256=sha256_hex(tensor_bytes),
        dtype="float16" if dtype == "float16" else "float32",
    )
    manifest = manifest.model_copy(update={"domain": domain, "labels": list(labels), **manifest_fields})
    return ArtifactFiles(manifest, manifest_to_json(manifest), tensor_bytes)


def make_backbone_artifact(
    tensors: Mapping[str, np.ndarray] | None = None,
    *,
    name: str = "tiny",
    fingerprint: str = EXAMPLE_FINGERPRINT,
    architecture: Mapping[str, Any] | None = None,
    **manifest_fields: Any,
) -> ArtifactFiles:
    """A valid backbone artifact (default: two small random conv weights)."""
    if tensors is None:
        rng = np.random.default_rng(0)
        tensors = {
            "stem.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
            "layers.0.conv.weight": rng.standard_normal((8, 4, 3, 3)).astype(np.float32),
        }
    tensor_bytes = safetensors.numpy.save(dict(tensors))
    manifest = BackboneManifest(
        name=name,
        architecture=ArchitectureConfig.model_validate(architecture or {"name": name, "kwargs": {}}),
        fingerprint=fingerprint,
        sha256=sha256_hex(tensor_bytes),
        created_at=datetime(2024, 1, 1, tzinfo=UTC),
    )
    manifest = manifest.model_copy(update=manifest_fields)
    return ArtifactFiles(manifest, manifest_to_json(manifest), tensor_bytes, BACKBONE_TENSORS_NAME)


def validated(
    files: ArtifactFiles,
    *,
    spec: Mapping[str, tuple[tuple[int, ...], str]] | None = None,
    fingerprint: str = EXAMPLE_FINGERPRINT,
) -> ValidatedArtifact:
    """Validate fabricated files against ``spec`` (default: ``spec_for_labels``); raises ``ArtifactInvalid``."""
    return validate_domain_artifact(
        files.manifest_bytes,
        files.tensor_bytes,
        spec_for=spec_for_labels if spec is None else (lambda manifest: spec),
        fingerprint=fingerprint,
    )
