"""The depthwise kind: where its kernel deltas go, what they cost, that every bank path applies them (and
sees a small fault in them), and that their storage lives only while a depthwise domain is resident."""

from __future__ import annotations

import pytest
import torch

from residual_adapters import AdapterConfig, MultiDomainNet, create_backbone
from tests.numerics import difference_bound, relative_error
from tests.residual_adapters.conftest import randomise_base, randomise_domain


@pytest.fixture(scope="module")
def mobilenet() -> MultiDomainNet:
    torch.manual_seed(0)
    net = create_backbone("mobilenet_v2", classifier_domain=None).eval()
    randomise_base(net)
    for i, kind in enumerate(("parallel", "depthwise")):
        net.add_domain(kind, AdapterConfig(kind=kind), num_classes=3 + i)  # type: ignore[arg-type]
        randomise_domain(net, kind, seed=i)
    net.load_domains_into_bank()
    return net


def test_every_depthwise_conv_gets_a_delta_of_its_kernel_shape(mobilenet: MultiDomainNet) -> None:
    parallel = mobilenet.domain_spec(AdapterConfig(kind="parallel"), 3)
    depthwise = mobilenet.domain_spec(AdapterConfig(kind="depthwise"), 3)
    extra = {k: v for k, v in depthwise.items() if k not in parallel}
    units = {u.name: u for u in mobilenet.units}
    assert len(extra) == len(mobilenet.depthwise_units()) == 17  # MobileNetV2's 3x3 depthwise convs
    for key, (shape, _) in extra.items():
        conv = units[key.removesuffix(".depthwise.weight")].conv
        assert conv is not None and conv.groups == conv.in_channels > 1
        assert shape == (conv.out_channels, 1, 3, 3)
    assert {k: v for k, v in depthwise.items() if k in parallel} == parallel
    counts = {
        k: mobilenet.domain_parameter_counts(AdapterConfig(kind=k), 3) for k in ("parallel", "depthwise")
    }  # type: ignore[arg-type]
    channels = sum(units[n].channels for n in mobilenet.depthwise_units())
    assert counts["depthwise"]["adapter"] - counts["parallel"]["adapter"] == 9 * channels == 64_224


def test_on_a_network_without_depthwise_convs_it_is_parallel() -> None:
    net = create_backbone("resnet26", width=0.25)
    assert net.depthwise_units() == []
    assert net.domain_spec(AdapterConfig(kind="depthwise"), 3) == net.domain_spec(
        AdapterConfig(kind="parallel"), 3
    )


def test_deltas_follow_the_allocation(mobilenet: MultiDomainNet) -> None:
    names = mobilenet.depthwise_units()

    def deltas(config: AdapterConfig) -> list[str]:
        spec = mobilenet.domain_spec(config, 3)
        return [n for n in names if f"{n}.depthwise.weight" in spec]

    assert deltas(AdapterConfig(kind="depthwise", allocation="none")) == []
    assert deltas(AdapterConfig(kind="depthwise", allocation="deep")) == names[11:]  # the last third of 17
    dense = mobilenet.adaptable_units()[0]
    listed = AdapterConfig(kind="depthwise", allocation=[dense, names[3]])
    assert deltas(listed) == [names[3]]
    assert f"{dense}.adapter.weight" in mobilenet.domain_spec(listed, 3)
    with pytest.raises(ValueError, match="cannot take adapters"):
        mobilenet.domain_spec(AdapterConfig(kind="parallel", allocation=[names[3]]), 3)


@torch.no_grad()
def test_the_deltas_change_the_output_and_every_bank_path_sees_a_small_fault(
    mobilenet: MultiDomainNet,
) -> None:
    """The bound is tight enough to see the depthwise deltas alone off by 1e-3 (relative; they are a fifth of
    their kernels' scale, so the kernels move by 2e-4; measured: 18x the bound): the bank keeps the true
    values, the domain's modules get the fault."""
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    slot = list(mobilenet.domains).index("depthwise")
    deltas = [
        p for k, p in mobilenet.domain_parameters("depthwise").items() if k.endswith(".depthwise.weight")
    ]
    reference = mobilenet.forward_domain(x, "depthwise")
    saved = [p.clone() for p in deltas]
    for p in deltas:
        p.zero_()
    without = mobilenet.forward_domain(x, "depthwise")
    for p, s in zip(deltas, saved, strict=True):
        p.copy_(s * (1 + 1e-3))
    try:
        faulty = mobilenet.forward_domain(x, "depthwise")
    finally:
        for p, s in zip(deltas, saved, strict=True):
            p.copy_(s)
    bound = difference_bound(mobilenet)
    assert relative_error(without, reference) > 1e-2
    index = torch.tensor([slot, 0, slot])
    for strategy in ("segments", "gather"):
        mobilenet.mixed_strategy = strategy  # type: ignore[assignment]
        try:
            mixed = mobilenet(x, index)[[0, 2], : reference.shape[1]]
            assert relative_error(mixed, reference[[0, 2]]) < bound, strategy
            assert relative_error(mixed, faulty[[0, 2]]) > bound, strategy
            assert relative_error(mobilenet.forward_slot(x, slot), faulty) > bound, strategy
        finally:
            mobilenet.mixed_strategy = "auto"
    assert relative_error(mobilenet.forward_merged(x, slot), faulty) > bound


@torch.no_grad()
def test_depthwise_storage_lives_only_while_a_depthwise_domain_is_resident(mobilenet: MultiDomainNet) -> None:
    slot = list(mobilenet.domains).index("depthwise")
    with_delta = mobilenet.bank_bytes()
    mobilenet.bank_clear(slot)
    without = mobilenet.bank_bytes()
    head = (4 * 1280 + 4) * 4
    channels = sum(u.channels for u in mobilenet.units if u.depthwise)
    assert with_delta - without == head + len(mobilenet.slots) * 9 * channels * 4
    assert all(u.bank is not None and u.bank.depthwise is None for u in mobilenet.units)
    mobilenet.bank_load(slot, AdapterConfig(kind="depthwise"), mobilenet.domain_state("depthwise"))
    assert mobilenet.bank_bytes() == with_delta
