"""The paper's ResNet-26 (as in the official models.py), with a width multiplier for fast tests.

stem: 3x3 conv 3->32, stride 1, domain BN, no ReLU; three stages of four BasicBlocks (64/128/256 at
width 1), stride 2 at the first block of every stage; shortcut where the shape changes: 2x2 average
pool + zero channel padding (no weights); per-domain final BN + ReLU, global average pool, head.
25 convolutions + 1 linear.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from residual_adapters.backbones import register_backbone
from residual_adapters.network import MultiDomainNet
from residual_adapters.units import DomainHead, DomainUnit


def _unit(c_in: int, c_out: int, stride: int) -> DomainUnit:
    conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return DomainUnit(conv, nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _unit(c_in, c_out, stride)
        self.conv2 = _unit(c_out, c_out, 1)
        self.stride = stride
        self.pad = c_out - c_in

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        shortcut = x
        if self.stride != 1:
            shortcut = F.avg_pool2d(shortcut, self.stride)
        if self.pad:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.pad))
        return (y + shortcut).relu_()  # in place on the fresh sum: no second block-sized tensor


class ResNet26(nn.Module):
    def __init__(self, width: float) -> None:
        super().__init__()
        base = max(1, round(32 * width))
        self.stem = _unit(3, base, 1)
        stages = []
        c_in = base
        for c_out in (2 * base, 4 * base, 8 * base):
            blocks = [BasicBlock(c_in, c_out, 2)] + [BasicBlock(c_out, c_out, 1) for _ in range(3)]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.end_bn = DomainUnit(None, nn.BatchNorm2d(c_in))
        self.head = DomainHead(c_in)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.end_bn(self.stages(self.stem(x))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))  # type: ignore[no-any-return]


@register_backbone("resnet26")
def resnet26(
    *, width: float = 1.0, weights: str | Path | None = None, classifier_domain: str | None = None
) -> MultiDomainNet:
    if weights is not None:
        raise ValueError("resnet26 has no torchvision weights: load a backbone artifact instead")
    return MultiDomainNet(ResNet26(width), {"name": "resnet26", "kwargs": {"width": width}})
