"""The one place that knows both an artifact (``adapters_store``) and a model (``residual_adapters``).

    config = adapter_config(manifest.adapter)                # manifest -> AdapterConfig
    net = backbone_network(stored.manifest, tensors)         # backbone artifact -> network, fingerprint checked
    validate_domain_artifact(..., spec_for=spec_for(net), fingerprint=net.fingerprint())
    manifest, tensor_bytes = domain_artifact(net, "birds", labels=..., preprocessing=..., provenance=...)

Serving, training, the ``multidomain`` commands and the benchmarks all convert through these functions,
so an artifact means the same network wherever it is read. Nothing below this package imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import Tensor

from adapters_store.manifest import (
    AdapterSettings,
    ArchitectureConfig,
    BackboneManifest,
    DomainManifest,
    Preprocessing,
    Provenance,
    domain_format_version,
    manifest_to_json,
)
from adapters_store.validation import (
    DomainSpec,
    SpecFor,
    ValidatedArtifact,
    sha256_hex,
    validate_domain_artifact,
)
from residual_adapters import AdapterConfig, MultiDomainNet, create_backbone

DomainArtifact = tuple[DomainManifest, bytes]
"""A domain manifest and its adapter.safetensors bytes."""
BackboneArtifact = tuple[BackboneManifest, bytes]
"""A backbone manifest and its backbone.safetensors bytes."""

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# Architecture kwargs that would make create_backbone read files other than the artifact's own tensors.
_NON_STRUCTURAL_KWARGS = frozenset({"weights", "classifier_domain"})


class BackboneRefused(ValueError):
    """A backbone artifact the model library cannot turn into its network (unknown architecture, tensors
    that do not fit it, weights whose fingerprint is not the manifest's)."""

    def __init__(self, field: str, message: str, code: str) -> None:
        super().__init__(message)
        self.field = field
        """Where the problem is, in the store's ``Problem`` notation (``manifest.fingerprint``...)."""
        self.code = code
        """``schema``, ``backbone`` or ``fingerprint``."""


# -- manifest <-> AdapterConfig ---------------------------------------------------------------------------


def adapter_config(settings: AdapterSettings) -> AdapterConfig:
    """The model library's config for a manifest's adapter settings (raises ``ValueError`` on a layout the
    library refuses, e.g. ``lowrank`` without a rank or an unknown allocation)."""
    return AdapterConfig.from_dict(settings.model_dump())


def adapter_settings(config: AdapterConfig) -> AdapterSettings:
    """The manifest's adapter settings for a model config."""
    return AdapterSettings.model_validate(config.to_dict())


def spec_for(net: MultiDomainNet) -> SpecFor:
    """The ``spec_for`` callable of ``validate_domain_artifact``: the tensors a manifest implies on ``net``."""

    def spec(manifest: DomainManifest) -> DomainSpec:
        return net.domain_spec(adapter_config(manifest.adapter), len(manifest.labels))

    return spec


# -- backbone artifact <-> network ------------------------------------------------------------------------


def backbone_network(
    manifest: BackboneManifest, tensors: Mapping[str, Tensor | np.ndarray]
) -> MultiDomainNet:
    """The network of a backbone artifact, its shared weights loaded and its fingerprint checked.

    No domain is built in (an imported classifier is a domain artifact of its own). Raises
    ``BackboneRefused`` naming what does not fit.
    """
    arch = manifest.architecture
    non_structural = _NON_STRUCTURAL_KWARGS & set(arch.kwargs)
    if non_structural:
        msg = f"kwargs {sorted(non_structural)} are not structural; the weights come from the artifact's tensors"
        raise BackboneRefused("manifest.architecture", msg, "schema")
    kwargs: dict[str, Any] = dict(arch.kwargs)  # structural (checked above): width, ...
    try:
        net = create_backbone(arch.name, classifier_domain=None, **kwargs)
    except (KeyError, TypeError, ValueError) as exc:
        msg = f"the model library cannot build this architecture: {exc}"
        raise BackboneRefused("manifest.architecture", msg, "backbone") from None
    try:
        net.load_shared_state_dict(
            {k: torch.from_numpy(v.copy()) if isinstance(v, np.ndarray) else v for k, v in tensors.items()}
        )
    except ValueError as exc:  # DomainMismatch: names or shapes that are not this architecture's
        raise BackboneRefused("tensors", f"the tensors do not fit {arch.name}: {exc}", "backbone") from None
    fingerprint = net.fingerprint()
    if fingerprint != manifest.fingerprint:
        msg = f"weights give fingerprint {fingerprint}, the manifest says {manifest.fingerprint}"
        raise BackboneRefused("manifest.fingerprint", msg, "fingerprint")
    return net


def tensors_to_bytes(tensors: Mapping[str, Tensor], dtype: str = "float32") -> bytes:
    """safetensors bytes of CPU, contiguous tensors; floating tensors are cast to ``dtype``."""
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(_TORCH_DTYPES)}")
    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        t = t.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(_TORCH_DTYPES[dtype])
        out[name] = t.contiguous()
    return safetensors.torch.save(out)


def backbone_artifact(net: MultiDomainNet) -> BackboneArtifact:
    """The shared (frozen) weights of ``net`` as a backbone artifact."""
    tensor_bytes = tensors_to_bytes(net.shared_state_dict())
    manifest = BackboneManifest(
        name=str(net.architecture["name"]),
        architecture=ArchitectureConfig.model_validate(net.architecture),
        fingerprint=net.fingerprint(),
        sha256=sha256_hex(tensor_bytes),
        created_at=datetime.now(UTC),
    )
    return manifest, tensor_bytes


# -- domain artifact <-> network --------------------------------------------------------------------------


def domain_artifact(
    net: MultiDomainNet,
    name: str,
    *,
    labels: list[str],
    preprocessing: Preprocessing,
    provenance: Provenance,
    dtype: str = "float32",
    domain: str | None = None,
) -> DomainArtifact:
    """Domain ``name`` of ``net`` as a validated artifact (``domain`` renames it in the manifest).

    Raises ``adapters_store.errors.ArtifactInvalid`` if the result would be refused by the server.
    """
    info = net.domains[name]
    if len(labels) != info.num_classes:
        raise ValueError(
            f"domain {name!r} has {info.num_classes} classes but {len(labels)} labels were given"
        )
    tensor_bytes = tensors_to_bytes(net.domain_state(name), dtype)
    manifest = DomainManifest(
        format_version=domain_format_version(info.config.kind),
        domain=domain or name,
        labels=list(labels),
        backbone=str(net.architecture["name"]),
        backbone_fingerprint=net.fingerprint(),
        adapter=adapter_settings(info.config),
        preprocessing=preprocessing,
        provenance=provenance,
        sha256=sha256_hex(tensor_bytes),
        dtype="float16" if dtype == "float16" else "float32",
    )
    validate_domain(manifest_to_json(manifest), tensor_bytes, net)
    return manifest, tensor_bytes


def validate_domain(manifest_bytes: bytes, tensor_bytes: bytes, net: MultiDomainNet) -> ValidatedArtifact:
    """The store's validation against ``net`` (its spec and fingerprint)."""
    return validate_domain_artifact(
        manifest_bytes, tensor_bytes, spec_for=spec_for(net), fingerprint=net.fingerprint()
    )


def load_validated_domain(net: MultiDomainNet, validated: ValidatedArtifact, name: str | None = None) -> None:
    """Add a validated domain artifact to ``net`` as a trainable float32 domain (``name`` or its own)."""
    tensors = {k: torch.from_numpy(v.copy()).float() for k, v in validated.tensors.items()}
    net.load_domain(name or validated.manifest.domain, adapter_config(validated.manifest.adapter), tensors)
