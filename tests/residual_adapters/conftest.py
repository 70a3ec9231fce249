from __future__ import annotations

import torch

from residual_adapters import AdapterConfig, MultiDomainNet

KIND_CONFIGS = {
    "parallel": AdapterConfig(kind="parallel"),
    "series": AdapterConfig(kind="series"),
    "lowrank": AdapterConfig(kind="lowrank", rank=3),
    "bn": AdapterConfig(kind="bn"),
    "head": AdapterConfig(kind="head"),
    "depthwise": AdapterConfig(kind="depthwise"),
}


@torch.no_grad()
def randomise_base(net: MultiDomainNet, seed: int = 0, size: int = 32) -> None:
    """Base BN statistics measured on random images (momentum 1: one batch), so activations stay
    well-scaled through deep random networks and tests do not ride on identity BN."""
    torch.manual_seed(seed)
    net.add_domain("_calibration", AdapterConfig(kind="bn"), num_classes=1)
    for unit in net.units:
        unit.domains["_calibration"].bn.momentum = 1.0
    was_training = net.training
    net.train()
    net.forward_domain(torch.randn(16, 3, size, size), "_calibration")
    net.train(was_training)
    for unit in net.units:
        bn = unit.domains["_calibration"].bn
        unit.base_bn.running_mean.copy_(bn.running_mean)
        unit.base_bn.running_var.copy_(bn.running_var)
        unit.base_bn.weight.uniform_(0.8, 1.2)
        unit.base_bn.bias.normal_(0, 0.1)
    net.remove_domain("_calibration")


@torch.no_grad()
def randomise_domain(net: MultiDomainNet, name: str, seed: int) -> None:
    """Non-trivial domain tensors near the base network's scale (a fresh domain equals the base)."""
    g = torch.Generator().manual_seed(seed)
    units = {u.name: u for u in net.units}

    def noise(t: torch.Tensor, std: float) -> torch.Tensor:
        return torch.randn(t.shape, generator=g) * std

    for key, t in net.domain_state(name).items():
        if key.endswith(("running_var", "bn.weight")):
            t.mul_(1 + noise(t, 0.2).clamp(-0.5, 0.5))
        elif key.endswith(("running_mean", "bn.bias")):
            t.add_(noise(t, 0.1))
        elif key.endswith(".depthwise.weight"):  # a correction of the kernel: a fifth of its own scale
            conv = units[key.removesuffix(".depthwise.weight")].conv
            assert conv is not None
            t.copy_(noise(t, 0.2 * float(conv.weight.std())))
        else:  # adapters and heads
            t.copy_(noise(t, 0.03))
