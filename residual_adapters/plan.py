"""Forward plans: which parameters every unit of a network uses for one forward call.

A plan is an immutable value, one class per kind of forward, made by `MultiDomainNet` for one call and
installed for exactly that call (`running(plan)`); each unit reads it (`current_plan()`) and dispatches on
its type, so a unit can only read the fields its kind of forward sets:

    forward_base(x)            BasePlan()                             base BN, the imported classifier
    forward_domain(x, name)    DomainPlan(domain)                     one domain's trainable modules
    forward_slot(x, slot)      SlotPlan(slot, series, strategy,       one bank slot, unmerged
                                        depthwise)
    forward(x, domain_index)   MixedPlan(slot_index, segments,        the bank, each row its own slot
                                         series, strategy, depthwise)
    forward_merged(x, slot)    MergedPlan(slot, weights)              one slot's folded conv weights

Why ambient at all: the units sit deep inside torchvision's own module code (`Bottleneck.forward`,
`InvertedResidual.forward`, ...), whose signatures take only `x`. Passing the plan through them would mean
rewriting every architecture; a `contextvars.ContextVar` carries it past them unchanged instead. It is set
and reset around one call, and every thread (and asyncio task) has its own value, so two threads can run
different forwards on one network at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal, NamedTuple

from torch import Tensor, nn

MixedStrategy = Literal["segments", "gather"]
"""How a bank forward applies adapters: one GEMM per run of rows sharing a slot (segments, best on CPU), or a
per-row gather and one batched GEMM per layer (gather, fewer kernel launches on GPU)."""

MergedConv = tuple[Tensor, Tensor]
"""One unit's folded (weight, bias): adapter in the centre tap, BN in weight and bias."""


class Segment(NamedTuple):
    """A run of rows of a slot-sorted batch that share one bank slot: rows [start, end)."""

    slot: int
    start: int
    end: int


@dataclass(frozen=True)
class BasePlan:
    """The plain backbone: base BN, and the imported classifier if the network has one."""


@dataclass(frozen=True)
class DomainPlan:
    """One domain's trainable modules (training, and the reference every bank path is tested against)."""

    domain: str


@dataclass(frozen=True)
class SlotPlan:
    """Every row through one bank slot, unmerged (inference only)."""

    slot: int
    series: bool
    """Whether the slot's domain has series adapters (else that path is skipped)."""
    strategy: MixedStrategy
    depthwise: bool = False
    """Whether the slot's domain has depthwise kernel deltas (else depthwise convs run shared)."""


@dataclass(frozen=True, eq=False)
class MixedPlan:
    """Rows sorted by bank slot, each row through its own slot (inference only)."""

    slot_index: Tensor
    """The bank slot of every row, shape [B], sorted."""
    segments: tuple[Segment, ...]
    """The runs of rows that share a slot, in row order."""
    series: bool
    """Whether any row's domain has series adapters (else that path is skipped)."""
    strategy: MixedStrategy
    depthwise: bool = False
    """Whether any row's domain has depthwise kernel deltas (else depthwise convs run shared)."""


@dataclass(frozen=True, eq=False)
class MergedPlan:
    """Every row through one slot's merged weights, at the plain backbone's cost (inference only)."""

    slot: int
    weights: Mapping[nn.Module, MergedConv]
    """Unit -> its folded weights for this slot (made once per slot by `MultiDomainNet.merge`). Keyed by the
    unit itself, not its name, so a plan made for another network fails instead of running its weights."""


ForwardPlan = BasePlan | DomainPlan | SlotPlan | MixedPlan | MergedPlan
PLAN_KINDS = (BasePlan, DomainPlan, SlotPlan, MixedPlan, MergedPlan)


class ForwardPlanError(RuntimeError):
    """A unit ran with no plan installed, or with a plan it cannot carry out."""


_current: ContextVar[ForwardPlan | None] = ContextVar("residual_adapters_forward_plan", default=None)


@contextmanager
def running(plan: ForwardPlan) -> Iterator[ForwardPlan]:
    """Install `plan` for the units for the duration of the `with` block (this thread or task only)."""
    if not isinstance(plan, PLAN_KINDS):
        raise TypeError(f"{plan!r} is not a forward plan; expected one of {[k.__name__ for k in PLAN_KINDS]}")
    token = _current.set(plan)
    try:
        yield plan
    finally:
        _current.reset(token)


def current_plan(unit: str) -> ForwardPlan:
    """The plan of the forward this thread is running; `unit` names the caller for the error."""
    plan = _current.get()
    if plan is None:
        raise ForwardPlanError(
            f"unit {unit or '(unnamed)'} ran outside a planned forward: call the network through "
            "forward_base / forward_domain / forward_slot / forward / forward_merged, "
            "or install a plan with residual_adapters.plan.running(...)"
        )
    return plan
