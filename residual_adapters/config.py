"""Adapter configuration: what a domain adds to the shared backbone, and where."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from domain_format.kinds import (
    ADAPTER_KINDS,
    DEFAULT_ALLOCATION,
    DEFAULT_KIND,
    DEFAULT_POINTWISE_BUDGET,
    DEFAULT_RANK,
    KINDS_WITH_ADAPTERS,
    KINDS_WITH_DEPTHWISE,
    KINDS_WITH_DOMAIN_BN,
    AdapterKind,
)

# Named allocations for the paper's parameter-allocation study: fractions of the adaptable units, in depth order.
NAMED_ALLOCATIONS: dict[str, list[tuple[float, float]]] = {
    "all": [(0.0, 1.0)],
    "none": [],
    "shallow": [(0.0, 1 / 3)],
    "middle": [(1 / 3, 2 / 3)],
    "deep": [(2 / 3, 1.0)],
    "shallow+deep": [(0.0, 1 / 3), (2 / 3, 1.0)],
}


@dataclass(frozen=True)
class AdapterConfig:
    """One domain's adapter layout. JSON-able: the manifest stores `to_dict()`. The kinds and defaults
    are `domain_format.kinds`' (the manifest's `AdapterSettings` is built from the same names)."""

    kind: AdapterKind = DEFAULT_KIND
    """One of `domain_format.kinds.ADAPTER_KINDS` (see `AdapterKind` there for what each computes)."""

    rank: int | None = DEFAULT_RANK
    """Rank of U_d V_d for `lowrank` (required there); ignored by other kinds."""

    allocation: str | list[str] = DEFAULT_ALLOCATION
    """Which units get adapters: all, none, shallow, middle, deep (thirds of the adaptable units in depth
    order), shallow+deep, "range:A-B" (fractions, e.g. "range:0.25-0.75"), or an explicit list of unit names.
    Every unit keeps its domain BN whatever the allocation. Depthwise deltas (kind `depthwise`) follow the
    same allocation over the depthwise convs, in their own depth order (a list names them directly)."""

    pointwise_budget: float = DEFAULT_POINTWISE_BUDGET
    """1x1 convolutions get low-rank adapters so a domain stays small: rank = ceil(budget * Cout*Cin/(Cout+Cin)),
    i.e. about `budget` of that conv's weights (a full 1x1 adapter on a 1x1 conv would double it)."""

    unit_ranks: dict[str, int] = field(default_factory=dict)
    """Per-unit rank overrides (written by SVD compression): unit name -> rank."""

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"unknown adapter kind {self.kind!r}; expected one of {ADAPTER_KINDS}")
        if self.kind == "lowrank" and (self.rank is None or self.rank < 1):
            raise ValueError("adapter kind 'lowrank' needs rank >= 1")
        if not 0 < self.pointwise_budget <= 1:
            raise ValueError("pointwise_budget must be in (0, 1]")
        if any(r < 1 for r in self.unit_ranks.values()):
            raise ValueError("unit_ranks must all be >= 1")
        if isinstance(self.allocation, str):
            allocation_ranges(self.allocation)  # validates

    @property
    def has_adapters(self) -> bool:
        return self.kind in KINDS_WITH_ADAPTERS

    @property
    def has_depthwise(self) -> bool:
        """Whether depthwise convs get a per-domain kernel delta (see `AdapterKind`)."""
        return self.kind in KINDS_WITH_DEPTHWISE

    @property
    def has_domain_bn(self) -> bool:
        return self.kind in KINDS_WITH_DOMAIN_BN

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        data = dict(data)
        if isinstance(data.get("allocation"), tuple):
            data["allocation"] = list(data["allocation"])
        return cls(**data)


def allocation_ranges(allocation: str) -> list[tuple[float, float]]:
    """Depth ranges (fractions of the adaptable units) named by an allocation string."""
    if allocation in NAMED_ALLOCATIONS:
        return NAMED_ALLOCATIONS[allocation]
    if allocation.startswith("range:"):
        try:
            lo, hi = (float(v) for v in allocation.removeprefix("range:").split("-"))
        except ValueError as exc:
            raise ValueError(f"bad allocation range {allocation!r}; expected 'range:A-B'") from exc
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"bad allocation range {allocation!r}: need 0 <= A < B <= 1")
        return [(lo, hi)]
    raise ValueError(
        f"unknown allocation {allocation!r}; expected one of {sorted(NAMED_ALLOCATIONS)}, 'range:A-B'"
    )


def select_units(allocation: str | list[str], names: list[str]) -> set[str]:
    """The subset of adaptable unit `names` (in depth order) that an allocation selects."""
    if isinstance(allocation, list):
        unknown = sorted(set(allocation) - set(names))
        if unknown:
            raise ValueError(f"allocation names units that cannot take adapters: {unknown}")
        return set(allocation)
    n = len(names)
    chosen: set[str] = set()
    for lo, hi in allocation_ranges(allocation):
        # Round to whole units so thirds of 25 units are 8/9/8, never empty for n >= 3.
        chosen.update(names[math.floor(lo * n + 0.5) : math.floor(hi * n + 0.5)])
    return chosen


def pointwise_rank(c_out: int, c_in: int, budget: float) -> int:
    """Rank that gives a 1x1 adapter about `budget` of a c_out x c_in matrix's parameters."""
    return max(1, math.ceil(budget * c_out * c_in / (c_out + c_in)))
