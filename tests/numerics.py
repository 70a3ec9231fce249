"""The rounding-error model behind every numeric tolerance in the tests.

Two code paths that compute the same function in floating point (mixed batch vs one row alone, merged
vs unmerged weights, a reloaded artifact vs the trained network) differ only by rounding. A dot product
of length n computed in precision u (unit roundoff, 2**-24 for float32) has, with high probability, a
relative error of order ``sqrt(n) * u`` (the probabilistic model of Higham & Mary, SIAM J. Sci. Comput.
2019: rounding errors of a sum behave like a random walk, which is what blocked and vectorised kernels
give in practice); through a network the layers' errors add. So one path's relative error against the
exact result is about

    path_bound(net) = u * sum over every conv / linear layer l of sqrt(fan_in_l)

and two paths differ by at most twice that. The bound depends on the network's shape and the dtype
only, never on which kernels a CPU picks (MKL, oneDNN and ATen choose differently on AMD, AVX2 and
AVX-512/AMX machines): `make test-portability` runs the suite under each kernel set, and on this
project's machines the largest observed difference was 0.63 of `path_bound` (0.31 of the bound the tests
use). It still catches real faults: scaling one domain's adapters by 1e-3 moves the output by 14-48x
the bound (`tests/residual_adapters/test_equivalence.py::test_bound_catches_a_small_adapter_fault`).

Errors are measured relative to the largest magnitude of the reference output (a logit row), the scale
the rounding errors are proportional to.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def unit_roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2


def accumulation_depth(module: nn.Module) -> float:
    """Sum over the module's conv and linear layers of sqrt(fan-in): how much rounding can accumulate."""
    depth = 0.0
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            depth += math.sqrt(m.in_channels // m.groups * kh * kw)
        elif isinstance(m, nn.Linear):
            depth += math.sqrt(m.in_features)
    return depth


def path_bound(module: nn.Module, dtype: torch.dtype = torch.float32) -> float:
    """Relative error of one floating-point path through `module` against the exact result."""
    return unit_roundoff(dtype) * accumulation_depth(module)


def difference_bound(module: nn.Module, dtype: torch.dtype = torch.float32) -> float:
    """Relative difference between two paths that compute the same function: each may err by `path_bound`."""
    return 2 * path_bound(module, dtype)


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference over the reference's largest magnitude."""
    return float((got - reference).abs().max() / reference.abs().max())


def probability_bound(module: nn.Module, logit_scale: float, classes: int) -> float:
    """Absolute difference of softmax probabilities from two paths whose logits (of magnitude up to
    `logit_scale`) differ by `difference_bound`: the softmax's Jacobian has infinity-norm at most 1/2,
    and the softmax itself rounds once per class in the sum."""
    u = unit_roundoff(torch.float32)
    return 0.5 * difference_bound(module) * logit_scale + 4 * classes * u
