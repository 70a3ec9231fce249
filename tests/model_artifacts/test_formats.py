"""Manifest format versions: depthwise artifacts are written as format 2, every other as format 1, and a
format-1 artifact written before format 2 existed (a committed fixture) still loads and serves beside one."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import torch

from adapters_store.manifest import Preprocessing, Provenance, manifest_to_json
from model_artifacts import domain_artifact, load_validated_domain, validate_domain
from residual_adapters import AdapterConfig, MultiDomainNet, create_backbone
from tests.model_artifacts.format_v1 import FIXTURE, fixture_backbone
from tests.numerics import difference_bound, relative_error
from training.export import load_domain_into, read_domain

PRE = Preprocessing(input_size=32, resize=36, mean=[0.5] * 3, std=[0.25] * 3, channels="rgb")
PROV = Provenance(dataset="test", epochs=0, created_at=datetime(2026, 12, 1, tzinfo=UTC))


def create_mobilenet() -> MultiDomainNet:
    torch.manual_seed(0)
    return create_backbone("mobilenet_v2", classifier_domain=None).eval()


@pytest.mark.parametrize(
    ("kind", "version"), [("parallel", 1), ("lowrank", 1), ("head", 1), ("depthwise", 2)]
)
def test_artifacts_are_written_in_the_format_their_kind_needs(kind: str, version: int) -> None:
    net = create_mobilenet()
    config = AdapterConfig(kind=kind, rank=2 if kind == "lowrank" else None)  # type: ignore[arg-type]
    net.add_domain("d", config, num_classes=2)
    manifest, tensor_bytes = domain_artifact(net, "d", labels=["a", "b"], preprocessing=PRE, provenance=PROV)
    assert manifest.format_version == version
    tensors = validate_domain(manifest_to_json(manifest), tensor_bytes, net).tensors
    assert any(k.endswith(".depthwise.weight") for k in tensors) == (kind == "depthwise")


@torch.no_grad()
def test_a_format_1_artifact_from_before_format_2_loads_and_serves_beside_a_format_2_one() -> None:
    manifest, _ = read_domain(FIXTURE)
    assert manifest.format_version == 1 and manifest.adapter.kind == "parallel"
    net = fixture_backbone()
    assert net.fingerprint() == manifest.backbone_fingerprint  # the fixture's backbone, rebuilt exactly
    load_domain_into(net, FIXTURE)
    net.add_domain("dw", AdapterConfig(kind="depthwise"), num_classes=2)
    g = torch.Generator().manual_seed(2)
    for t in net.domain_parameters("dw").values():
        t.normal_(0, 0.03, generator=g)
    dw_manifest, dw_bytes = domain_artifact(net, "dw", labels=["a", "b"], preprocessing=PRE, provenance=PROV)
    assert dw_manifest.format_version == 2
    net.remove_domain("dw")
    load_validated_domain(net, validate_domain(manifest_to_json(dw_manifest), dw_bytes, net))
    mapping = net.load_domains_into_bank()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    index = torch.tensor([mapping["shapes"], mapping["dw"], mapping["shapes"], mapping["dw"]])
    mixed = net(x, index)
    bound = difference_bound(net)
    assert relative_error(mixed[[0, 2], :4], net.forward_domain(x[[0, 2]], "shapes")) < bound
    assert relative_error(mixed[[1, 3], :2], net.forward_domain(x[[1, 3]], "dw")) < bound
