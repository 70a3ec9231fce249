"""Per-domain parameter modules (the trainable, natural form of one domain at one unit).

    x ──► W (shared, frozen) ──► z ──(+)──► BN_d ──► y          parallel: (+) adds A_d ∗ x (1x1, conv stride)
    └──────────── A_d ────────────┘                             series:   (+) adds A_d ∗ BN'_d(z)

    x ──► (W + D_d) ──► BN_d ──► y                              depthwise conv (kind depthwise): a delta
                                                                D_d of W's own shape, [C, 1, kh, kw]

`A_d` is a 1x1 matrix, full or low-rank (U_d V_d). It starts at zero so a new domain starts as the base
network; a low-rank V starts random so the gradient reaches U (as LoRA does). `D_d` starts at zero too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AdapterShape = tuple[str, int, int, int | None]
"""(mode "parallel"|"series", c_out, c_in, rank or None for a full matrix)."""

BN_TENSORS = ("weight", "bias", "running_mean", "running_var")
"""The tensors of one BN, as a domain spec names them (`<unit>.bn.<tensor>`)."""


def is_adapter_tensor(name: str) -> bool:
    """Whether a domain tensor (by spec name) is an adapter's: a 1x1 matrix (`<unit>.adapter.*`) or a
    depthwise kernel delta (`<unit>.depthwise.weight`), as opposed to BN and head tensors."""
    dotted = f".{name}"
    return ".adapter." in dotted or ".depthwise." in dotted


class AdapterMatrix(nn.Module):
    """A 1x1 adapter matrix [c_out, c_in]: full (`weight`) or low-rank (`u` [c_out, r] @ `v` [r, c_in])."""

    def __init__(self, c_out: int, c_in: int, rank: int | None) -> None:
        super().__init__()
        self.rank = rank
        if rank is None:
            self.weight = nn.Parameter(torch.zeros(c_out, c_in))
        else:
            self.u = nn.Parameter(torch.zeros(c_out, rank))
            self.v = nn.Parameter(torch.randn(rank, c_in) / math.sqrt(c_in))

    def matrix(self) -> Tensor:
        return self.weight if self.rank is None else self.u @ self.v

    def forward(self, x: Tensor) -> Tensor:
        if self.rank is None:
            return F.conv2d(x, self.weight[:, :, None, None])
        return F.conv2d(F.conv2d(x, self.v[:, :, None, None]), self.u[:, :, None, None])


class DepthwiseDelta(nn.Module):
    """A per-domain delta `weight` of a depthwise conv's kernel shape [C, 1, kh, kw]: y = (W + D) * x."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(shape))


class DomainUnitParams(nn.Module):
    """One domain's tensors at one conv+BN unit: its BN, and optionally an adapter (parallel or series)
    or, at a depthwise conv, a delta of its kernel."""

    def __init__(
        self,
        channels: int,
        base_bn: nn.BatchNorm2d,
        *,
        domain_bn: bool,
        adapter: AdapterShape | None,
        depthwise: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.bn: nn.BatchNorm2d | None = None
        if domain_bn:
            self.bn = nn.BatchNorm2d(channels, eps=base_bn.eps, momentum=base_bn.momentum)
            self.bn.load_state_dict(base_bn.state_dict())  # start from the backbone's statistics
        self.adapter: AdapterMatrix | None = None
        self.series_bn: nn.BatchNorm2d | None = None
        self.mode: str | None = None
        if adapter is not None:
            mode, c_out, c_in, rank = adapter
            self.mode = mode
            self.adapter = AdapterMatrix(c_out, c_in, rank)
            if mode == "series":
                self.series_bn = nn.BatchNorm2d(c_out, eps=base_bn.eps)
        self.depthwise: DepthwiseDelta | None = None if depthwise is None else DepthwiseDelta(depthwise)
