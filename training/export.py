"""Artifacts out of a trained network: backbone and domain manifests + safetensors bytes.

Every domain artifact is checked with the store's own validation (``validate_domain_artifact``) before
it is returned, so what the trainer writes is exactly what the server will accept.

On disk an artifact is a directory of ``manifest.json`` + ``adapter.safetensors`` (domain) or
``backbone.safetensors`` (backbone); a domain artifact can also be written as a single-file bundle
(the store's tar form, what ``POST /domains`` accepts).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor

from adapters_store.bundle import pack_bundle, unpack_bundle
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
    parse_domain_manifest,
)
from adapters_store.validation import (
    DomainSpec,
    SpecFor,
    ValidatedArtifact,
    ValidatedBackbone,
    sha256_hex,
    validate_backbone_artifact,
    validate_domain_artifact,
)
from residual_adapters import AdapterConfig, MultiDomainNet, create_backbone

DomainArtifact = tuple[DomainManifest, bytes]
BackboneArtifact = tuple[BackboneManifest, bytes]

_DTYPES = {"float32": torch.float32, "float16": torch.float16}

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def tensors_to_bytes(tensors: Mapping[str, Tensor], dtype: str = "float32") -> bytes:
    """safetensors bytes of CPU, contiguous tensors; floating tensors are cast to ``dtype``."""
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        t = t.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(_DTYPES[dtype])
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


def spec_for_net(net: MultiDomainNet) -> SpecFor:
    """The ``spec_for`` callable of ``validate_domain_artifact`` for this network."""

    def spec_for(manifest: DomainManifest) -> DomainSpec:
        cfg = AdapterConfig.from_dict(manifest.adapter.model_dump())
        return net.domain_spec(cfg, len(manifest.labels))

    return spec_for


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
        domain=domain or name,
        labels=list(labels),
        backbone=str(net.architecture["name"]),
        backbone_fingerprint=net.fingerprint(),
        adapter=AdapterSettings.model_validate(info.config.to_dict()),
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
        manifest_bytes, tensor_bytes, spec_for=spec_for_net(net), fingerprint=net.fingerprint()
    )


def unique_labels(labels: list[str]) -> list[str]:
    """Make repeated labels unique, deterministically: the 2nd "crane" becomes "crane (2)".

    ImageNet's category list repeats some names (two "crane"s, two "maillot"s in older lists), but a
    manifest requires unique labels; numbering in order of appearance keeps the head order intact.
    """
    seen: dict[str, int] = {}
    taken = set(labels)
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        if seen[label] == 1:
            out.append(label)
            continue
        n = seen[label]
        while f"{label} ({n})" in taken:
            n += 1
        out.append(f"{label} ({n})")
        taken.add(out[-1])
    return out


def imagenet_preprocessing(input_size: int = 224, resize: int = 256) -> Preprocessing:
    """torchvision's ImageNet eval transform: resize 256, centre crop 224, ImageNet mean/std, bilinear."""
    return Preprocessing(
        input_size=input_size,
        resize=resize,
        mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD),
        channels="rgb",
        interpolation="bilinear",
    )


def imagenet_labels() -> list[str]:
    import torchvision

    categories = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    return unique_labels(list(categories))


def import_torchvision(
    name: str, weights_path: Path, classifier_domain: str | None = "imagenet"
) -> tuple[BackboneArtifact, DomainArtifact | None]:
    """A torchvision state_dict file -> backbone artifact (+ its classifier as a head-only domain)."""
    net = create_backbone(name, weights=weights_path, classifier_domain=classifier_domain)
    backbone = backbone_artifact(net)
    if classifier_domain is None:
        return backbone, None
    provenance = Provenance(
        dataset=f"ImageNet-1k (torchvision {name} weights {Path(weights_path).name})",
        epochs=0,
        val_accuracy=None,
        created_at=datetime.now(UTC),
    )
    domain = domain_artifact(
        net,
        classifier_domain,
        labels=imagenet_labels(),
        preprocessing=imagenet_preprocessing(),
        provenance=provenance,
    )
    return backbone, domain


# -- files ----------------------------------------------------------------------------------------------


def write_domain_dir(artifact: DomainArtifact, path: Path) -> Path:
    """Write ``manifest.json`` + ``adapter.safetensors`` into ``path`` (created)."""
    manifest, tensor_bytes = artifact
    path.mkdir(parents=True, exist_ok=True)
    (path / DOMAIN_TENSORS_NAME).write_bytes(tensor_bytes)
    (path / MANIFEST_NAME).write_bytes(manifest_to_json(manifest))
    return path


def write_backbone_dir(artifact: BackboneArtifact, path: Path) -> Path:
    """Write ``manifest.json`` + ``backbone.safetensors`` into ``path`` (created)."""
    manifest, tensor_bytes = artifact
    path.mkdir(parents=True, exist_ok=True)
    (path / BACKBONE_TENSORS_NAME).write_bytes(tensor_bytes)
    (path / MANIFEST_NAME).write_bytes(manifest_to_json(manifest))
    return path


def write_bundle(artifact: DomainArtifact, path: Path) -> Path:
    """Write the single-file (tar) form of a domain artifact."""
    manifest, tensor_bytes = artifact
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pack_bundle(manifest_to_json(manifest), tensor_bytes))
    return path


def read_domain_bytes(path: Path) -> tuple[bytes, bytes]:
    """``(manifest_bytes, tensor_bytes)`` of a domain artifact directory or bundle file (not validated)."""
    if path.is_dir():
        return (path / MANIFEST_NAME).read_bytes(), (path / DOMAIN_TENSORS_NAME).read_bytes()
    return unpack_bundle(path.read_bytes())


def read_domain(path: Path) -> DomainArtifact:
    """A domain artifact directory or bundle, schema- and checksum-checked (not against a backbone)."""
    manifest_bytes, tensor_bytes = read_domain_bytes(path)
    manifest = parse_domain_manifest(manifest_bytes)
    if sha256_hex(tensor_bytes) != manifest.sha256:
        raise ValueError(f"{path}: sha256 of {DOMAIN_TENSORS_NAME} does not match its manifest")
    return manifest, tensor_bytes


def read_backbone(path: Path) -> ValidatedBackbone:
    """A backbone artifact directory, validated by the store (schema, checksum, finite values)."""
    return validate_backbone_artifact(
        (path / MANIFEST_NAME).read_bytes(), (path / BACKBONE_TENSORS_NAME).read_bytes()
    )


def load_backbone(path: Path) -> MultiDomainNet:
    """Rebuild the network of a backbone artifact directory and check its fingerprint."""
    validated = read_backbone(path)
    arch = validated.manifest.architecture
    net = create_backbone(arch.name, **arch.kwargs)  # type: ignore[arg-type]
    net.load_shared_state_dict({k: torch.from_numpy(v.copy()) for k, v in validated.tensors.items()})
    if net.fingerprint() != validated.manifest.fingerprint:
        raise ValueError(f"{path}: weights do not match the manifest's fingerprint")
    return net


def load_domain_into(net: MultiDomainNet, path: Path, name: str | None = None) -> DomainManifest:
    """Validate a domain artifact against ``net`` and add it as a trainable domain (``name`` or its own)."""
    manifest_bytes, tensor_bytes = read_domain_bytes(path)
    validated = validate_domain(manifest_bytes, tensor_bytes, net)
    manifest = validated.manifest
    tensors = {k: torch.from_numpy(v.copy()).float() for k, v in validated.tensors.items()}
    net.load_domain(name or manifest.domain, AdapterConfig.from_dict(manifest.adapter.model_dump()), tensors)
    return manifest
