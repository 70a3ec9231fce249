"""Forward plans: each forward installs exactly its own plan, for that call and that thread only; a unit
with no plan or a plan it cannot carry out fails naming what is wrong."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import Tensor

from residual_adapters import MultiDomainNet, create_backbone
from residual_adapters.plan import (
    BasePlan,
    DomainPlan,
    ForwardPlan,
    ForwardPlanError,
    MergedPlan,
    MixedPlan,
    SlotPlan,
    current_plan,
    running,
)
from tests.residual_adapters.conftest import KIND_CONFIGS, randomise_base, randomise_domain

ROUNDS = 12  # forwards per thread once both have passed the barrier


def build(seed: int = 0) -> MultiDomainNet:
    torch.manual_seed(seed)
    net = create_backbone("resnet26", width=0.25).eval()
    randomise_base(net, seed=seed, size=16)
    for i, (kind, config) in enumerate(KIND_CONFIGS.items()):
        net.add_domain(kind, config, num_classes=3 + i)
        randomise_domain(net, kind, seed=seed + i)
    net.load_domains_into_bank()
    return net


@pytest.fixture(scope="module")
def net() -> MultiDomainNet:
    return build()


@pytest.fixture(scope="module")
def x() -> Tensor:
    return torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def forwards(net: MultiDomainNet, x: Tensor) -> dict[str, Callable[[], Tensor]]:
    """One call of every kind of forward; the series slot exercises the most bank code."""
    series = list(net.domains).index("series")
    index = torch.tensor([0, 1, 2, 3, 4, 1])
    return {
        "base": lambda: net.forward_base(x),
        "domain": lambda: net.forward_domain(x, "parallel"),
        "slot": lambda: net.forward_slot(x, series),
        "mixed": lambda: net(x, index),
        "merged": lambda: net.forward_merged(x, series),
    }


@torch.no_grad()
@pytest.mark.parametrize(
    "kinds",
    [("mixed", "domain"), ("merged", "mixed"), ("slot", "base"), ("merged", "domain"), ("slot", "mixed")],
)
def test_two_threads_running_different_forwards_each_get_their_own_result(
    net: MultiDomainNet, x: Tensor, kinds: tuple[str, str]
) -> None:
    calls = forwards(net, x)
    expected = {kind: calls[kind]() for kind in kinds}
    net.unmerge(list(net.domains).index("series"))  # so the merged thread's first call merges, concurrently
    barrier = threading.Barrier(len(kinds))

    def run(kind: str) -> list[Tensor]:
        barrier.wait()
        return [calls[kind]() for _ in range(ROUNDS)]

    with ThreadPoolExecutor(len(kinds)) as pool:
        results = dict(zip(kinds, pool.map(run, kinds), strict=True))
    for kind in kinds:
        assert all(torch.equal(out, expected[kind]) for out in results[kind]), kind


def test_kinds_under_test_give_different_results(net: MultiDomainNet, x: Tensor) -> None:
    """Guards the thread test against vacuous equality: every pair it runs differs in its outputs."""
    with torch.no_grad():
        outputs = {kind: call() for kind, call in forwards(net, x).items()}
    for a, b in [("mixed", "domain"), ("merged", "mixed"), ("slot", "base"), ("merged", "domain")]:
        k = min(outputs[a].shape[1], outputs[b].shape[1])
        assert not torch.allclose(outputs[a][:, :k], outputs[b][:, :k]), (a, b)
    # slot and mixed agree on the rows that use the series slot but not on the others
    assert not torch.allclose(outputs["slot"][:, :4], outputs["mixed"][:, :4])


@torch.no_grad()
def test_each_forward_installs_its_own_plan_for_the_call_only(net: MultiDomainNet, x: Tensor) -> None:
    seen: list[ForwardPlan] = []
    unit = net.units[5]
    hook = unit.register_forward_pre_hook(lambda _m, _a: seen.append(current_plan(unit.name)))
    try:
        for call in forwards(net, x).values():
            call()
        net(x, torch.full((6,), 2))  # a mixed batch whose rows share one slot takes the slot path
    finally:
        hook.remove()
    assert [type(p) for p in seen] == [BasePlan, DomainPlan, SlotPlan, MixedPlan, MergedPlan, SlotPlan]
    series = list(net.domains).index("series")
    _, domain, slot, mixed, merged, uniform = seen
    assert isinstance(domain, DomainPlan) and domain.domain == "parallel"
    assert isinstance(slot, SlotPlan) and (slot.slot, slot.series, slot.strategy) == (
        series,
        True,
        "segments",
    )
    assert isinstance(mixed, MixedPlan) and mixed.series and mixed.strategy == "segments"
    assert [tuple(s) for s in mixed.segments] == [(0, 0, 1), (1, 1, 3), (2, 3, 4), (3, 4, 5), (4, 5, 6)]
    assert mixed.slot_index.tolist() == [0, 1, 1, 2, 3, 4]
    assert isinstance(merged, MergedPlan) and merged.slot == series and unit in merged.weights
    assert isinstance(uniform, SlotPlan) and (uniform.slot, uniform.series) == (2, False)
    with pytest.raises(ForwardPlanError):
        current_plan("after")  # nothing is left installed


def test_plans_are_immutable() -> None:
    plan = SlotPlan(0, series=False, strategy="segments")
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.slot = 1  # type: ignore[misc]


def test_a_unit_or_body_with_no_plan_fails_naming_the_unit(net: MultiDomainNet, x: Tensor) -> None:
    with pytest.raises(ForwardPlanError, match=rf"unit {net.units[0].name} ran outside a planned forward"):
        net.units[0](x)
    with pytest.raises(ForwardPlanError, match="outside a planned forward"):
        net.body(x)
    with pytest.raises(ForwardPlanError, match="head ran outside a planned forward"):
        net.head(torch.zeros(1, net.head.in_features))


def test_a_plan_is_visible_to_its_own_thread_only(net: MultiDomainNet, x: Tensor) -> None:
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            net.units[0](x)
        except ForwardPlanError as exc:
            errors.append(exc)

    with running(BasePlan()):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert isinstance(current_plan("here"), BasePlan)
    assert len(errors) == 1 and "outside a planned forward" in str(errors[0])


def test_the_plan_is_removed_when_the_forward_fails(net: MultiDomainNet, x: Tensor) -> None:
    with pytest.raises(RuntimeError):  # wrong channel count: the stem conv fails mid-forward
        net.forward_base(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ForwardPlanError, match="outside a planned forward"):
        net.units[0](x)


def test_something_else_is_refused_as_a_plan() -> None:
    with pytest.raises(TypeError, match="is not a forward plan"), running("mixed"):  # type: ignore[arg-type]
        pass


@torch.no_grad()
def test_a_plan_the_units_cannot_carry_out_fails_clearly(net: MultiDomainNet, x: Tensor) -> None:
    with pytest.raises(ForwardPlanError, match="has no domain 'nope'"), running(DomainPlan("nope")):
        net.body(x)
    other = build(seed=1)  # the same architecture: the same unit names, other weights
    plans: list[ForwardPlan] = []
    hook = other.units[0].register_forward_pre_hook(lambda _m, _a: plans.append(current_plan("")))
    other.forward_merged(x, 0)
    hook.remove()
    with pytest.raises(ForwardPlanError, match="made for another network"), running(plans[0]):
        net.body(x)
    fresh = create_backbone("resnet26", width=0.25).eval()  # no bank enabled
    slot_plan = SlotPlan(0, series=False, strategy="segments")
    with pytest.raises(ForwardPlanError, match="has no adapter bank"), running(slot_plan):
        fresh.body(x)
