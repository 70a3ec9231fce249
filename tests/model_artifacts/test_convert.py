"""The glue between artifacts and models: one declaration of the adapter kinds, manifest <-> config,
backbone artifact -> checked network, spec_for, and every way a backbone artifact is refused."""

from __future__ import annotations

import dataclasses
from typing import get_args

import pytest
import torch

from adapters_store import AdapterSettings, ArtifactInvalid
from adapters_store.manifest import ArchitectureConfig
from domain_format import kinds
from model_artifacts import (
    BackboneRefused,
    adapter_config,
    adapter_settings,
    backbone_artifact,
    backbone_network,
    domain_artifact,
    spec_for,
    validate_domain,
)
from model_artifacts.torchvision_import import imagenet_preprocessing
from residual_adapters import AdapterConfig, create_backbone


@pytest.fixture(scope="module")
def net():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return create_backbone("resnet26", width=0.125).eval()


def test_config_and_manifest_settings_have_the_same_fields_and_defaults() -> None:
    config_fields = {f.name: f for f in dataclasses.fields(AdapterConfig)}
    settings_fields = AdapterSettings.model_fields
    assert tuple(config_fields) == tuple(settings_fields) == kinds.ADAPTER_FIELDS
    for name in ("rank", "allocation", "pointwise_budget"):
        assert config_fields[name].default == settings_fields[name].default, name
    assert AdapterSettings(kind="parallel").unit_ranks == AdapterConfig().unit_ranks == {}
    assert AdapterConfig().kind == kinds.DEFAULT_KIND
    assert settings_fields["kind"].is_required()  # a manifest says what it holds
    assert get_args(settings_fields["kind"].annotation) == kinds.ADAPTER_KINDS
    assert set(kinds.KINDS_WITH_ADAPTERS) < set(kinds.ADAPTER_KINDS)


@pytest.mark.parametrize("kind", kinds.ADAPTER_KINDS)
def test_every_kind_round_trips_through_the_manifest(kind: str) -> None:
    config = AdapterConfig(kind=kind, rank=3 if kind == "lowrank" else None, allocation="deep")  # type: ignore[arg-type]
    settings = adapter_settings(config)
    assert settings.kind == kind
    assert adapter_config(settings) == config
    assert config.has_adapters == (kind in kinds.KINDS_WITH_ADAPTERS)
    assert config.has_domain_bn == (kind in kinds.KINDS_WITH_DOMAIN_BN)


def test_a_layout_the_model_refuses_is_refused_at_conversion() -> None:
    with pytest.raises(ValueError, match="needs rank"):
        adapter_config(AdapterSettings(kind="lowrank"))
    with pytest.raises(ValueError, match="unknown allocation"):
        adapter_config(AdapterSettings(kind="parallel", allocation="sideways"))


def test_backbone_artifact_round_trips_to_an_equal_network(net) -> None:  # type: ignore[no-untyped-def]
    import safetensors.torch

    manifest, tensor_bytes = backbone_artifact(net)
    rebuilt = backbone_network(manifest, safetensors.torch.load(tensor_bytes))
    assert rebuilt.fingerprint() == net.fingerprint() == manifest.fingerprint
    assert rebuilt.domains == {}  # no classifier built in: domains come from the store


def test_backbone_refusals_name_what_does_not_fit(net) -> None:  # type: ignore[no-untyped-def]
    import safetensors.torch

    manifest, tensor_bytes = backbone_artifact(net)
    tensors = safetensors.torch.load(tensor_bytes)
    changed = dict(tensors)
    first = next(iter(changed))
    changed[first] = changed[first] + 1e-3  # one tensor off by a little: not the weights the manifest names
    with pytest.raises(BackboneRefused) as wrong:
        backbone_network(manifest, changed)
    assert (wrong.value.field, wrong.value.code) == ("manifest.fingerprint", "fingerprint")

    with pytest.raises(BackboneRefused) as missing:
        backbone_network(manifest, {k: v for k, v in tensors.items() if k != first})
    assert missing.value.field == "tensors" and first in str(missing.value)

    reads_a_file = manifest.model_copy(
        update={
            "architecture": ArchitectureConfig(
                name="resnet26", kwargs={"width": 0.125, "weights": "/etc/passwd"}
            )
        }
    )
    with pytest.raises(BackboneRefused) as kwargs:
        backbone_network(reads_a_file, tensors)
    assert kwargs.value.field == "manifest.architecture" and "weights" in str(kwargs.value)

    unknown = manifest.model_copy(update={"architecture": ArchitectureConfig(name="vgg99")})
    with pytest.raises(BackboneRefused, match="vgg99"):
        backbone_network(unknown, tensors)


def test_spec_for_and_validation_against_the_network(net) -> None:  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime

    from adapters_store import Provenance, manifest_to_json

    net.add_domain("pets", AdapterConfig(kind="series"), 3)
    try:
        manifest, tensor_bytes = domain_artifact(
            net,
            "pets",
            labels=["cat", "dog", "owl"],
            preprocessing=imagenet_preprocessing(24, 24),
            provenance=Provenance(dataset="t", epochs=0, created_at=datetime.now(UTC)),
        )
    finally:
        net.remove_domain("pets")
    assert spec_for(net)(manifest) == net.domain_spec(AdapterConfig(kind="series"), 3)
    validate_domain(manifest_to_json(manifest), tensor_bytes, net)
    other = create_backbone("resnet26", width=0.125)  # other random weights: another fingerprint
    with pytest.raises(ArtifactInvalid) as refused:
        validate_domain(manifest_to_json(manifest), tensor_bytes, other)
    assert "fingerprint" in {p.code for p in refused.value.problems}
