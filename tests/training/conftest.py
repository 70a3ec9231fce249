"""Fixtures for the training tests: a tiny ResNet-26 (width 0.125) and tiny real data (digits, 16 px)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import torch

from adapters_store.manifest import Provenance
from residual_adapters import MultiDomainNet, create_backbone
from training.data import DomainData, load_domain_data

SIZE = 16

# Tiny models gain nothing from threads, and on a shared 2-core machine competing OpenMP pools spin.
torch.set_num_threads(1)


def tiny_net(seed: int = 0) -> MultiDomainNet:
    torch.manual_seed(seed)
    net = create_backbone("resnet26", width=0.125)
    # Non-trivial base BN statistics, so a wrong BN path changes the outputs.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for unit in net.units:
            var, mean = unit.base_bn.running_var, unit.base_bn.running_mean
            assert var is not None and mean is not None
            var.copy_(torch.rand(unit.channels, generator=g) + 0.5)
            mean.copy_(torch.randn(unit.channels, generator=g) * 0.1)
    return net


@pytest.fixture
def net() -> MultiDomainNet:
    return tiny_net()


@pytest.fixture(scope="session")
def digits() -> DomainData:
    return load_domain_data(
        "digits", input_size=SIZE, train_per_class=12, val_per_class=6, test_fraction=0.1, test_per_class=4
    )


def provenance(val_accuracy: float | None = 0.5) -> Provenance:
    return Provenance(dataset="test", epochs=1, val_accuracy=val_accuracy, created_at=datetime.now(UTC))
