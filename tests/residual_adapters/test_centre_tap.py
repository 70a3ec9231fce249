"""The fused training path of parallel adapters computes the same values and gradients as W*x + A*x."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from residual_adapters.units import CentreTapConv


@pytest.mark.parametrize("stride", [1, 2])
def test_centre_tap_conv_matches_conv_plus_1x1(stride: int) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, stride=stride, padding=1, bias=False).double().requires_grad_(False)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    a = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a: CentreTapConv.apply(x, a, conv), (x, a))
    fused = CentreTapConv.apply(x, a, conv)
    reference = conv(x) + F.conv2d(x[:, :, ::stride, ::stride], a[:, :, None, None])
    assert torch.allclose(fused, reference, atol=1e-12)
    g = torch.randn_like(fused)
    grads = torch.autograd.grad(fused, (x, a), g)
    expected = torch.autograd.grad(reference, (x, a), g)
    assert all(torch.allclose(p, q, atol=1e-12) for p, q in zip(grads, expected, strict=True))
    assert conv.weight.grad is None  # the shared weight is never touched
