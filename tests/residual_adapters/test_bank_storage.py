"""The bank's storage: a wide head costs only its own slot, and the bank shrinks back once a domain leaves."""

from __future__ import annotations

import pytest
import torch

from residual_adapters import AdapterConfig, MultiDomainNet, create_backbone
from residual_adapters.bank import HeadBank
from tests.residual_adapters.conftest import KIND_CONFIGS, randomise_base, randomise_domain

WIDE = 10_000  # the head: 10,000 classes


@pytest.fixture
def net() -> MultiDomainNet:
    torch.manual_seed(0)
    net = create_backbone("resnet26", width=0.25).eval()
    randomise_base(net, size=16)
    for i, kind in enumerate(("parallel", "bn", "series")):
        net.add_domain(kind, KIND_CONFIGS[kind], num_classes=3 + i)
        randomise_domain(net, kind, seed=i)
    net.add_domain("wide", AdapterConfig(kind="parallel"), num_classes=WIDE)
    randomise_domain(net, "wide", seed=9)
    net.enable_bank(5)
    for slot, name in enumerate(("parallel", "bn")):
        net.bank_load(slot, net.domains[name].config, net.domain_state(name))
    return net


def head_bank(net: MultiDomainNet) -> HeadBank:
    assert net.head.bank is not None
    return net.head.bank


def buffer_sizes(net: MultiDomainNet) -> dict[str, tuple[int, ...]]:
    """Every bank buffer's shape, by name (absent: not allocated)."""
    return {
        name: tuple(t.shape)
        for name, t in net.named_buffers()
        if ".bank." in f".{name}" or name.startswith("bank.")
    }


@torch.no_grad()
def test_a_wide_head_costs_its_own_slot_and_leaves_nothing_behind(net: MultiDomainNet) -> None:
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    index = torch.tensor([0, 1, 1, 0, 1, 0])
    before_sizes, before_bytes = buffer_sizes(net), net.bank_bytes()
    before = net(x, index)
    assert before.shape == (6, 4)

    net.bank_load(2, net.domains["wide"].config, net.domain_state("wide"))
    features = net.head.in_features
    head_bytes = (WIDE * features + WIDE) * 4
    bank = head_bank(net)
    assert [bank.classes(s) for s in range(5)] == [3, 4, WIDE, 0, 0]
    assert tuple(bank.weight(0).shape) == (3, features) and tuple(bank.weight(1).shape) == (4, features)
    # Only the wide slot's own head (and its adapters' rows, preallocated) grew the bank.
    assert net.bank_bytes() == before_bytes + head_bytes
    grown = buffer_sizes(net)
    assert {k: v for k, v in grown.items() if k in before_sizes} == before_sizes
    added = sorted(set(grown) - set(before_sizes))
    assert (
        len(added) == 2 and added[0].endswith("head.bank.bias_2") and added[1].endswith("head.bank.weight_2")
    )

    # The other domains' rows give the same numbers while it is resident (bit for bit: the same kernels
    # run on the same rows), padded to the widest resident head with -inf.
    during = net(x, index)
    assert during.shape == (6, WIDE)
    assert torch.equal(during[:, :4].nan_to_num(neginf=0.0), before.nan_to_num(neginf=0.0))
    assert torch.isneginf(during[:, 4:]).all()
    mixed_with_wide = net(x, torch.tensor([0, 2, 1, 2, 1, 0]))
    assert torch.isfinite(mixed_with_wide[[1, 3]]).all()

    net.bank_clear(2)
    assert net.bank_bytes() == before_bytes
    assert buffer_sizes(net) == before_sizes
    assert head_bank(net).max_classes == 4
    after = net(x, index)
    assert after.shape == (6, 4)
    assert torch.equal(after.nan_to_num(neginf=0.0), before.nan_to_num(neginf=0.0))


@torch.no_grad()
def test_series_storage_is_released_with_its_last_domain(net: MultiDomainNet) -> None:
    before_bytes, before_sizes = net.bank_bytes(), buffer_sizes(net)
    series = net.domains["series"]
    net.bank_load(2, series.config, net.domain_state("series"))
    net.bank_load(3, series.config, net.domain_state("series"))
    assert net.bank_bytes() > before_bytes
    net.bank_clear(2)
    x = torch.randn(2, 3, 16, 16)
    # The remaining series slot still runs on its own storage, unchanged.
    assert torch.allclose(net.forward_slot(x, 3), net.forward_domain(x, "series"), rtol=0, atol=1e-4)
    net.bank_clear(3)
    assert net.bank_bytes() == before_bytes
    assert buffer_sizes(net) == before_sizes


@torch.no_grad()
def test_reloading_a_slot_with_a_narrower_domain_shrinks_it(net: MultiDomainNet) -> None:
    before_bytes = net.bank_bytes()
    net.bank_load(2, net.domains["wide"].config, net.domain_state("wide"))
    net.bank_load(2, net.domains["parallel"].config, net.domain_state("parallel"))  # LRU reuse of a slot
    assert head_bank(net).classes(2) == 3
    assert net.bank_bytes() == before_bytes + (3 * net.head.in_features + 3) * 4


@torch.no_grad()
def test_a_refused_load_changes_nothing(net: MultiDomainNet) -> None:
    series = net.domains["series"]
    net.bank_load(2, series.config, net.domain_state("series"))
    x = torch.randn(2, 3, 16, 16)
    before_bytes, before = net.bank_bytes(), net.forward_slot(x, 2)
    tensors = dict(net.domain_state("wide"))
    tensors["head.bias"] = tensors["head.bias"][:-1]  # does not fit the spec of its own head
    with pytest.raises(ValueError, match=r"head\.weight: shape"):
        net.bank_load(2, net.domains["wide"].config, tensors)
    assert net.slots[2] == series and net.bank_bytes() == before_bytes
    assert torch.equal(net.forward_slot(x, 2), before)


def test_padding_mask_is_exactly_the_padded_columns(net: MultiDomainNet) -> None:
    index = torch.tensor([1, 0, 0, 1])
    logits = net(torch.randn(4, 3, 16, 16), index)
    mask = net.padding_mask(index, logits.shape[1])
    assert mask.tolist() == [[False] * 4, [False] * 3 + [True], [False] * 3 + [True], [False] * 4]
    assert torch.equal(mask, torch.isneginf(logits))
