"""Merge math: a domain folded into plain conv weights, so a single-domain batch runs at the backbone's cost.

BN (eval):  y = x * scale + shift,  scale = gamma / sqrt(var + eps),  shift = beta - mean * scale
parallel:   W' = W + A at the centre tap (A is 1x1, so W*x + A*x = W'*x for 'same' padding)
depthwise:  W' = W + D (D has W's shape: a convolution is linear in its kernel)
series:     y = z + A (s' z + t')  =  (I + A diag(s')) z + A t'     (z = W*x)
then BN:    W'' = W' * scale (per output channel),  b'' = b' * scale + shift
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from residual_adapters.plan import MergedConv


def fold_bn(weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Eval-mode BN as y = x * scale + shift."""
    scale = (1 / torch.sqrt(var + eps)) * weight  # the order torch's own CPU batch_norm uses
    return scale, bias - mean * scale


def merge_conv(
    conv: nn.Conv2d | None,
    scale: Tensor,
    shift: Tensor,
    parallel: Tensor | None,
    series: tuple[Tensor, Tensor, Tensor] | None,
    depthwise: Tensor | None = None,
) -> MergedConv:
    """One unit's folded (weight, bias) from its folded BN (`scale`, `shift`, [C]), a parallel adapter
    [C_out, C_in], a series adapter with its folded inner BN (A [C_out, C_out], s' [C_out], t' [C_out]),
    and a depthwise conv's kernel delta (W's shape).

    A BN-only unit (no conv) folds to per-channel (scale, shift).
    """
    if conv is None:
        return scale.clone(), shift.clone()
    w = conv.weight.detach().clone()
    bias = conv.bias.detach().clone() if conv.bias is not None else torch.zeros_like(scale)
    kh, kw = w.shape[2] // 2, w.shape[3] // 2
    if parallel is not None:
        w[:, :, kh, kw] += parallel
    if depthwise is not None:
        w += depthwise
    if series is not None:
        a, inner_scale, inner_shift = series
        m = torch.eye(a.shape[0], dtype=a.dtype, device=a.device) + a * inner_scale[None, :]
        w = (m @ w.flatten(1)).view_as(w)
        bias = m @ bias + a @ inner_shift
    return (w * scale.view(-1, 1, 1, 1)).contiguous(), bias * scale + shift
