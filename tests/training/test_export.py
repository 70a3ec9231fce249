"""Export of real weights: torchvision's MobileNetV2 -> backbone + `imagenet` artifacts that still see a cat."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from skimage import data

from model_artifacts import (
    domain_artifact,
    import_torchvision,
    mobilenet_weights_installed,
    mobilenet_weights_path,
)
from model_artifacts.torchvision_import import imagenet_labels, unique_labels
from tests.numerics import probability_bound
from training import export


def test_unique_labels_numbers_repeats_in_order() -> None:
    assert unique_labels(["crane", "kite", "crane", "crane"]) == [
        "crane",
        "kite",
        "crane (2)",
        "crane (3)",
    ]
    # An existing "crane (2)" is never duplicated: the repeat takes the next free number.
    assert unique_labels(["crane", "crane (2)", "crane"]) == ["crane", "crane (2)", "crane (3)"]
    labels = imagenet_labels()
    assert len(labels) == 1000 and len(set(labels)) == 1000


@pytest.mark.skipif(not mobilenet_weights_installed(), reason="offline MobileNetV2 weights not installed")
def test_import_torchvision_round_trip_classifies_chelsea(tmp_path: Path) -> None:
    (backbone, domain) = import_torchvision("mobilenet_v2", mobilenet_weights_path())
    assert domain is not None
    manifest = domain[0]
    assert manifest.domain == "imagenet" and manifest.adapter.kind == "head"
    assert manifest.preprocessing.input_size == 224 and manifest.preprocessing.resize == 256
    assert manifest.backbone_fingerprint == backbone[0].fingerprint
    export.write_backbone_dir(backbone, tmp_path / "backbone")
    export.write_bundle(domain, tmp_path / "imagenet.tar")

    net = export.read_backbone_network(tmp_path / "backbone")
    loaded = export.load_domain_into(net, tmp_path / "imagenet.tar")
    net.eval()
    transform = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.transforms()
    x = transform(torch.from_numpy(data.chelsea()).permute(2, 0, 1))[None]
    with torch.no_grad():
        probs = net.forward_domain(x, "imagenet").softmax(-1)[0]
        reference = torchvision.models.mobilenet_v2()
        reference.load_state_dict(torch.load(mobilenet_weights_path(), weights_only=True))
        logits = reference.eval()(x)
        expected = logits.softmax(-1)[0]
    tolerance = probability_bound(reference, logit_scale=float(logits.abs().max()), classes=logits.shape[1])
    assert float((probs - expected).abs().max()) < tolerance
    assert loaded.labels[int(probs.argmax())] == "Egyptian cat"


def test_import_without_classifier() -> None:
    (backbone, domain) = import_torchvision("mobilenet_v2", mobilenet_weights_path(), classifier_domain=None)
    assert domain is None and backbone[0].architecture.name == "mobilenet_v2"


def test_read_domain_refuses_a_tampered_tensor_file(tmp_path: Path) -> None:
    from residual_adapters import AdapterConfig
    from tests.training.conftest import provenance, tiny_net
    from training.data import load_domain_data

    net = tiny_net()
    net.add_domain("d", AdapterConfig(kind="bn"), 3)
    pre = load_domain_data("textures", input_size=8, train_per_class=2, val_per_class=1).preprocessing
    artifact = domain_artifact(net, "d", labels=["a", "b", "c"], preprocessing=pre, provenance=provenance())
    path = export.write_domain_dir(artifact, tmp_path / "d")
    assert export.read_domain(path)[0].domain == "d"
    tensors = path / "adapter.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ValueError, match="sha256"):
        export.read_domain(path)


def test_backbone_shortcut_matches_the_servers_imported_backbone() -> None:
    """`--backbone mobilenet_v2` must train against exactly the weights the server's first run stores."""
    from training.backbones import load_backbone

    (backbone, _), _domain = import_torchvision("mobilenet_v2", mobilenet_weights_path())
    assert load_backbone("mobilenet_v2").fingerprint() == backbone.fingerprint
