"""ResNets load a local torchvision state_dict file and keep its classifier as a domain of its own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from residual_adapters import create_backbone
from tests.numerics import difference_bound, relative_error


@torch.no_grad()
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_state_dict_file_reproduces_torchvision(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(num_classes=1000).eval()
    for module in reference.modules():  # non-trivial BN statistics, as a trained network has
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / f"{name}.pth"
    torch.save(reference.state_dict(), path)
    net = create_backbone(name, weights=path).eval()
    x = torch.randn(2, 3, 64, 64)
    assert relative_error(net.forward_domain(x, "imagenet"), reference(x)) < difference_bound(reference)
    assert torch.equal(net.forward_base(x), net.forward_domain(x, "imagenet"))
    convs = [u for u in net.units if u.conv is not None]
    assert len(convs) == sum(isinstance(m, torch.nn.Conv2d) for m in reference.modules())


def test_unknown_backbone_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="unknown backbone 'resnet99'"):
        create_backbone("resnet99")
