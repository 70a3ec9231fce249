"""Every registered backbone: a mixed batch equals each row run alone; merged equals unmerged."""

from __future__ import annotations

import pytest
import torch

from residual_adapters import MultiDomainNet, create_backbone, list_backbones
from tests.numerics import difference_bound, relative_error
from tests.residual_adapters.conftest import KIND_CONFIGS, randomise_base, randomise_domain

BUILD = {"resnet26": {"width": 0.25}}


def rtol(net: MultiDomainNet) -> float:
    """Two paths of the same function differ by rounding only: bounded by the error model (tests/numerics.py)."""
    return difference_bound(net, next(net.parameters()).dtype)


def build(name: str, dtype: torch.dtype) -> MultiDomainNet:
    torch.manual_seed(0)
    net = create_backbone(name, **BUILD.get(name, {})).eval()
    randomise_base(net)
    for i, (kind, config) in enumerate(KIND_CONFIGS.items()):
        net.add_domain(kind, config, num_classes=3 + i)  # different class counts exercise head padding
        randomise_domain(net, kind, seed=i)
    net.to(dtype)
    net.load_domains_into_bank()
    return net


@pytest.fixture(scope="module", params=list_backbones())
def net(request: pytest.FixtureRequest) -> MultiDomainNet:
    return build(request.param, torch.float32)


def test_every_backbone_is_registered() -> None:
    assert set(list_backbones()) >= {"resnet26", "resnet18", "resnet34", "resnet50", "mobilenet_v2"}


@torch.no_grad()
@pytest.mark.parametrize("strategy", ["segments", "gather"])
def test_mixed_batch_rows_equal_each_domain_alone(net: MultiDomainNet, strategy: str) -> None:
    net.mixed_strategy = strategy  # type: ignore[assignment]
    try:
        check_mixed(net)
    finally:
        net.mixed_strategy = "auto"


@torch.no_grad()
@pytest.mark.parametrize("name", ["resnet26", "resnet18", "resnet50", "mobilenet_v2"])  # every block type
def test_paths_are_the_same_function_in_float64(name: str) -> None:
    net = build(name, torch.float64)
    check_mixed(net)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for slot, kind in enumerate(net.domains):
        assert relative_error(net.forward_merged(x, slot), net.forward_domain(x, kind)) < rtol(net), kind


def check_mixed(net: MultiDomainNet) -> None:
    names = list(net.domains)
    dtype = next(net.parameters()).dtype
    x = torch.randn(2 * len(names), 3, 32, 32, dtype=dtype)
    index = torch.tensor([i % len(names) for i in range(len(x))])[torch.randperm(len(x))]
    mixed = net(x, index)
    for row in range(len(x)):
        name = names[int(index[row])]
        alone = net.forward_domain(x[row : row + 1], name)[0]
        k = net.domains[name].num_classes
        assert relative_error(mixed[row, :k], alone) < rtol(net), (name, row)
        assert torch.isinf(mixed[row, k:]).all() and (mixed[row, k:] < 0).all()


@torch.no_grad()
@pytest.mark.parametrize("kind", list(KIND_CONFIGS))
def test_merged_and_single_slot_equal_unmerged(net: MultiDomainNet, kind: str) -> None:
    x = torch.randn(3, 3, 32, 32)
    slot = list(net.domains).index(kind)
    reference = net.forward_domain(x, kind)
    assert relative_error(net.forward_merged(x, slot), reference) < rtol(net)
    assert relative_error(net.forward_slot(x, slot), reference) < rtol(net)
    net.mixed_strategy = "gather"
    assert relative_error(net.forward_slot(x, slot), reference) < rtol(net)
    net.mixed_strategy = "auto"
    # A mixed batch whose rows all share one slot takes the no-gather shortcut: same numbers, padded.
    uniform = net(x, torch.full((3,), slot))
    assert relative_error(uniform[:, : reference.shape[1]], reference) < rtol(net)


@torch.no_grad()
def test_domains_actually_differ(net: MultiDomainNet) -> None:
    """Guards the tests above against vacuous equality: adapted domains change the output."""
    x = torch.randn(2, 3, 32, 32)
    parallel = net.forward_domain(x, "parallel")
    net.add_domain("fresh", KIND_CONFIGS["parallel"], num_classes=3)
    with torch.no_grad():
        net.domain_parameters("fresh")["head.weight"].copy_(net.domain_state("parallel")["head.weight"])
        net.domain_parameters("fresh")["head.bias"].copy_(net.domain_state("parallel")["head.bias"])
    fresh = net.forward_domain(x, "fresh")
    net.remove_domain("fresh")
    assert relative_error(fresh, parallel) > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("kind", ["parallel", "series"])
def test_bound_catches_a_small_adapter_fault(net: MultiDomainNet, kind: str) -> None:
    """The bound is loose enough for any CPU's rounding and still tight enough to see a domain whose adapters
    are off by 1e-3 (relative): the bank keeps the true values, the domain's own modules get the fault."""
    x = torch.randn(3, 3, 32, 32)
    slot = list(net.domains).index(kind)
    adapters = [p for key, p in net.domain_parameters(kind).items() if ".adapter" in key]
    assert adapters
    for p in adapters:
        p.mul_(1 + 1e-3)
    try:
        faulty = net.forward_domain(x, kind)
    finally:
        for p in adapters:
            p.div_(1 + 1e-3)
    assert relative_error(net.forward_slot(x, slot), faulty) > rtol(net)
    assert relative_error(net.forward_merged(x, slot), faulty) > rtol(net)
