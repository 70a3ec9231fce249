"""Joint adapter compression (the paper's SVD step): low-rank factorisation of each 1x1 adapter matrix.

For every adapted unit of a parallel (or low-rank) domain, the adapter matrix A [C_out, C_in] (the
full weight, or u @ v where the unit already stores factors, e.g. the 1x1 convs of torchvision
backbones: those are re-truncated) is replaced by ``u @ v`` of a smaller rank:

- rank by ``energy``: the smallest rank keeping that fraction of sum(sigma^2) (1.0 = full rank, exact);
- rank by ``budget``: that fraction of the unit's adapter parameters, r = floor(budget * n / (C_out + C_in)).

With ``shared_basis`` the domains' matrices of a unit are stacked side by side, [A_1 ... A_D], and one
orthonormal basis U (C_out x r) is kept for all of them, v_d = U^T A_d: the paper's *joint*
compression. Each artifact still stores its own copy of U (artifacts are independent), so the saving
counts U once across the domains (``unique_parameters``).

The result is a ``lowrank`` domain with a rank per unit (``unit_ranks``) and tensors
``<unit>.adapter.u`` / ``<unit>.adapter.v``: a normal artifact the library and the server load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from residual_adapters import AdapterConfig, MultiDomainNet, check_tensors


class CompressionError(Exception):
    """A domain cannot be compressed (series adapters, no adapters, bad settings)."""


@dataclass
class CompressedDomain:
    name: str
    config: AdapterConfig
    tensors: dict[str, Tensor]
    adapter_parameters_before: int
    adapter_parameters_after: int
    ranks: dict[str, int] = field(default_factory=dict)


@dataclass
class CompressionReport:
    domains: dict[str, CompressedDomain]
    shared_basis: bool
    unique_parameters: int
    """Adapter parameters of all compressed domains together, a shared basis counted once."""

    @property
    def parameters_before(self) -> int:
        return sum(d.adapter_parameters_before for d in self.domains.values())

    @property
    def parameters_after(self) -> int:
        return sum(d.adapter_parameters_after for d in self.domains.values())


@dataclass
class DenseAdapter:
    """One unit's adapter as a dense matrix for the SVD, and how it is stored (the model's own
    ``residual_adapters.adapters.AdapterMatrix`` is the trainable module)."""

    matrix: Tensor
    """[C_out, C_in], float64 for the SVD."""
    rank: int
    """The rank it is stored at (min(C_out, C_in) for a full matrix)."""
    factored: bool
    """Stored as u @ v (True) or as a full matrix."""

    @property
    def stored_parameters(self) -> int:
        c_out, c_in = self.matrix.shape
        return self.rank * (c_out + c_in) if self.factored else c_out * c_in


def adapter_matrices(net: MultiDomainNet, name: str) -> dict[str, DenseAdapter]:
    """unit name -> its adapter matrix, for a parallel or low-rank domain."""
    info = net.domains[name]
    if info.config.kind == "series":
        raise CompressionError(
            f"domain {name!r} has series adapters; SVD compression applies to parallel ones"
        )
    if info.config.has_depthwise:
        raise CompressionError(
            f"domain {name!r} has depthwise deltas; SVD compression applies to parallel and low-rank domains"
        )
    if not info.config.has_adapters:
        raise CompressionError(f"domain {name!r} (kind {info.config.kind}) has no adapters to compress")
    state = net.domain_state(name)
    out: dict[str, DenseAdapter] = {}
    for key, value in state.items():
        if key.endswith(".adapter.weight"):
            out[key.removesuffix(".adapter.weight")] = DenseAdapter(value.double(), min(value.shape), False)
        elif key.endswith(".adapter.u"):
            unit = key.removesuffix(".adapter.u")
            product = value.double() @ state[f"{unit}.adapter.v"].double()
            out[unit] = DenseAdapter(product, int(value.shape[1]), True)
    return out


def _choose_rank(
    s: Tensor, cap: int, params_before: int, dims: int, energy: float | None, budget: float | None
) -> int:
    if energy is not None:
        if energy >= 1.0:
            return cap
        power = s[:cap].pow(2)
        total = float(power.sum())
        if total == 0.0:  # an untouched (zero) adapter: rank 1 of zeros is exact
            return 1
        cumulative = power.cumsum(0) / total
        return min(cap, int((cumulative < energy).sum()) + 1)
    assert budget is not None
    return max(1, min(cap, int(budget * params_before // dims)))


def compress_domains(
    net: MultiDomainNet,
    names: list[str],
    *,
    energy: float | None = None,
    budget: float | None = None,
    shared_basis: bool = False,
    bank_rank_cap: bool = True,
) -> CompressionReport:
    """Compress the adapters of ``names`` (domains of ``net``); ``net`` itself is not changed.

    Exactly one of ``energy`` (fraction of squared singular values kept, in (0, 1]) or ``budget``
    (fraction of adapter parameters kept, in (0, 1]) chooses the ranks. ``bank_rank_cap`` (shared basis
    only): keep a factored unit's shared rank within one domain's stored rank, as the server's bank needs;
    False lifts that cap (an analysis of how much the domains share: such domains load into a network
    for evaluation, not into a bank).
    """
    if (energy is None) == (budget is None):
        raise CompressionError("give exactly one of energy or budget")
    limit = energy if energy is not None else budget
    assert limit is not None
    if not 0.0 < limit <= 1.0:
        raise CompressionError(f"energy/budget must be in (0, 1], got {limit}")
    if not names:
        raise CompressionError("no domains to compress")
    matrices = {name: adapter_matrices(net, name) for name in names}
    units = list(matrices[names[0]])
    if shared_basis and any(list(m) != units for m in matrices.values()):
        raise CompressionError(
            "a shared basis needs the same adapted units in every domain (same allocation)"
        )

    factors: dict[str, dict[str, tuple[Tensor, Tensor]]] = {name: {} for name in names}
    unique = 0
    if shared_basis:
        for unit in units:
            stacked = torch.cat([matrices[n][unit].matrix for n in names], dim=1)
            c_out, c_in = matrices[names[0]][unit].matrix.shape
            before = sum(matrices[n][unit].stored_parameters for n in names)
            u_full, s, _ = torch.linalg.svd(stacked, full_matrices=False)
            cap = min(len(s), sum(matrices[n][unit].rank for n in names))
            # Units stored as factors (torchvision 1x1 convs) are held by the server's bank at their
            # stored rank at most: a shared basis may not exceed it there.
            if bank_rank_cap:
                cap = min([cap] + [matrices[n][unit].rank for n in names if matrices[n][unit].factored])
            # Budget with U counted once: r * C_out + D * r * C_in <= budget * before.
            r = _choose_rank(s, cap, before, c_out + len(names) * c_in, energy, budget)
            basis = u_full[:, :r]
            for n in names:
                factors[n][unit] = (basis, basis.T @ matrices[n][unit].matrix)
            unique += r * c_out + len(names) * r * c_in
    else:
        for n in names:
            for unit, adapter in matrices[n].items():
                c_out, c_in = adapter.matrix.shape
                u_full, s, vh = torch.linalg.svd(adapter.matrix, full_matrices=False)
                r = _choose_rank(
                    s, min(adapter.rank, len(s)), adapter.stored_parameters, c_out + c_in, energy, budget
                )
                root = s[:r].sqrt()
                # Split sigma evenly between the factors: keeps both in a similar range (fp16 artifacts).
                factors[n][unit] = (u_full[:, :r] * root, root[:, None] * vh[:r])
                unique += r * (c_out + c_in)

    domains = {n: _build(net, n, factors[n]) for n in names}
    return CompressionReport(domains=domains, shared_basis=shared_basis, unique_parameters=unique)


def _build(net: MultiDomainNet, name: str, factors: dict[str, tuple[Tensor, Tensor]]) -> CompressedDomain:
    info = net.domains[name]
    state = net.domain_state(name)
    before = sum(v.numel() for k, v in state.items() if ".adapter." in k)
    tensors = {k: v.clone() for k, v in state.items() if ".adapter." not in k}
    ranks: dict[str, int] = {}
    for unit, (u, v) in factors.items():
        tensors[f"{unit}.adapter.u"] = u.float().contiguous()
        tensors[f"{unit}.adapter.v"] = v.float().contiguous()
        ranks[unit] = int(u.shape[1])
    old = info.config
    config = AdapterConfig(
        kind="lowrank",
        rank=max(ranks.values()),
        allocation=old.allocation,
        pointwise_budget=old.pointwise_budget,
        unit_ranks=ranks,
    )
    check_tensors(net.domain_spec(config, info.num_classes), tensors)
    after = sum(v.numel() for k, v in tensors.items() if ".adapter." in k)
    return CompressedDomain(name, config, tensors, before, after, ranks)
