from __future__ import annotations

import torch
from torch import nn

from residual_adapters import AdapterConfig, MultiDomainNet

KIND_CONFIGS = {
    "parallel": AdapterConfig(kind="parallel"),
    "series": AdapterConfig(kind="series"),
    "lowrank": AdapterConfig(kind="lowrank", rank=3),
    "bn": AdapterConfig(kind="bn"),
    "head": AdapterConfig(kind="head"),
}


def randomise_domain(net: MultiDomainNet, name: str, seed: int) -> None:
    """Give a domain non-trivial tensors (a fresh domain equals the base network)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in net.domain_state(name).items():
            if key.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif key.endswith("bn.weight"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def randomise_base(net: MultiDomainNet, seed: int = 0) -> None:
    """Random but well-scaled base BN statistics, so tests do not ride on identity BN."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for unit in net.units:
            bn: nn.BatchNorm2d = unit.base_bn
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
