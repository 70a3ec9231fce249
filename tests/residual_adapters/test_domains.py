"""Domain layout, lifecycle, parameter counting, spec and fingerprint."""

from __future__ import annotations

import pytest
import torch

from residual_adapters import AdapterConfig, DomainMismatch, create_backbone
from residual_adapters.config import pointwise_rank, select_units
from tests.numerics import difference_bound, relative_error
from tests.residual_adapters.conftest import randomise_domain


def test_resnet26_matches_the_paper() -> None:
    net = create_backbone("resnet26")
    convs = [u for u in net.units if u.conv is not None]
    assert len(convs) == 25 and all(tuple(u.conv.kernel_size) == (3, 3) for u in convs)  # type: ignore[union-attr]
    parallel = net.domain_parameter_counts(AdapterConfig(kind="parallel"), 10)
    series = net.domain_parameter_counts(AdapterConfig(kind="series"), 10)
    assert parallel["adapter"] == 645_216
    assert series["adapter"] == 689_152
    conv_weights = sum(u.conv.weight.numel() for u in convs)  # type: ignore[union-attr]
    assert abs(parallel["adapter"] / conv_weights - 0.111) < 0.001
    assert parallel["head"] == 256 * 10 + 10
    # Feature maps 64 -> 32 -> 16 -> 8 for a 64x64 input, 256 channels at the end.
    net.eval()
    shapes = []
    for stage in net.body.stages:  # type: ignore[union-attr]
        stage.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape[1:])))
    net.forward_base(torch.randn(1, 3, 64, 64))
    assert shapes == [(64, 32, 32), (128, 16, 16), (256, 8, 8)]


def test_params_multiplier_ten_domains_about_twice_one_network() -> None:
    net = create_backbone("resnet26")
    assert 2.0 < net.params_multiplier(10, AdapterConfig(kind="parallel")) < 2.2
    assert net.params_multiplier(10, AdapterConfig(kind="head")) == 1.0


def test_spec_lists_exactly_the_domain_tensors() -> None:
    net = create_backbone("resnet26", width=0.125)
    for config in (AdapterConfig(), AdapterConfig(kind="series"), AdapterConfig(kind="lowrank", rank=2)):
        net.add_domain("d", config, num_classes=7)
        state = net.domain_state("d")
        spec = net.domain_spec(config, 7)
        assert {k: (tuple(v.shape), "float32") for k, v in state.items()} == spec
        assert set(net.domain_parameters("d")) == {k for k in spec if "running_" not in k}
        net.remove_domain("d")
    assert set(net.domain_spec(AdapterConfig(kind="head"), 4)) == {"head.weight", "head.bias"}


def test_allocation_selects_units_by_depth() -> None:
    names = [f"u{i}" for i in range(25)]
    assert select_units("all", names) == set(names)
    assert select_units("none", names) == set()
    shallow, middle, deep = (select_units(a, names) for a in ("shallow", "middle", "deep"))
    assert shallow | middle | deep == set(names) and not (shallow & middle or middle & deep)
    assert "u0" in shallow and "u24" in deep
    assert select_units("shallow+deep", names) == shallow | deep
    assert select_units("range:0.0-0.2", names) == {f"u{i}" for i in range(5)}
    assert select_units(["u3", "u7"], names) == {"u3", "u7"}
    with pytest.raises(ValueError, match="cannot take adapters"):
        select_units(["nope"], names)
    with pytest.raises(ValueError, match="unknown allocation"):
        AdapterConfig(allocation="sideways")


def test_allocation_restricts_adapter_tensors() -> None:
    net = create_backbone("resnet26", width=0.125)
    deep = net.domain_spec(AdapterConfig(allocation="deep"), 3)
    adapted = {k.split(".adapter.")[0] for k in deep if ".adapter." in k}
    assert adapted == set(net.adaptable_units()[-8:])
    bn = [k for k in deep if k.endswith(".bn.weight")]
    assert len(bn) == len(net.units)  # every unit keeps its domain BN


@pytest.mark.parametrize("kind", ["parallel", "series", "lowrank", "bn", "head"])
def test_training_a_domain_leaves_shared_weights_bit_identical(kind: str) -> None:
    torch.manual_seed(0)
    net = create_backbone("resnet26", width=0.125)
    before = {k: v.clone() for k, v in net.shared_state_dict().items()}
    config = AdapterConfig(kind=kind, rank=2 if kind == "lowrank" else None)  # type: ignore[arg-type]
    net.add_domain("d", config, num_classes=4)
    params = net.domain_parameters("d")
    initial = {k: v.detach().clone() for k, v in params.items()}
    optimiser = torch.optim.SGD(params.values(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    net.train()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(
            net.forward_domain(torch.randn(8, 3, 16, 16), "d"), torch.randint(0, 4, (8,))
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after = net.shared_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(initial[k], v) for k, v in params.items())  # the domain did train
    assert all(
        not p.requires_grad for p in net.body.parameters() if id(p) not in {id(q) for q in params.values()}
    )


def test_add_and_remove_domains_at_run_time() -> None:
    net = create_backbone("resnet26", width=0.125).eval()
    fingerprint = net.fingerprint()
    net.add_domain("a", AdapterConfig(), 3)
    net.add_domain("b", AdapterConfig(kind="series"), 5)
    randomise_domain(net, "a", 1)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a = net.forward_domain(x, "a")
    net.remove_domain("b")
    with torch.no_grad():
        assert torch.equal(net.forward_domain(x, "a"), a)
    assert list(net.domains) == ["a"] and net.fingerprint() == fingerprint
    with pytest.raises(KeyError, match="unknown domain 'b'"):
        net.forward_domain(x, "b")
    with pytest.raises(ValueError, match="already exists"):
        net.add_domain("a", AdapterConfig(), 3)


def test_fingerprint_tracks_shared_weights_and_architecture() -> None:
    a, b = create_backbone("resnet26", width=0.125), create_backbone("resnet26", width=0.125)
    assert a.fingerprint() != b.fingerprint()  # different random init
    b.load_shared_state_dict(a.shared_state_dict())
    assert a.fingerprint() == b.fingerprint()
    with torch.no_grad():
        b.units[3].conv.weight[0, 0, 0, 0] += 1e-6  # type: ignore[union-attr]
    assert a.fingerprint() != b.fingerprint()
    c = create_backbone("resnet26", width=0.25)
    with pytest.raises(DomainMismatch, match="shape"):
        c.load_shared_state_dict(a.shared_state_dict())


def test_bank_refuses_tensors_that_do_not_fit() -> None:
    net = create_backbone("resnet26", width=0.125).eval()
    net.add_domain("d", AdapterConfig(), 3)
    net.enable_bank(2)
    state = dict(net.domain_state("d"))
    key = next(k for k in state if ".adapter." in k)
    with pytest.raises(DomainMismatch, match=key.replace(".", r"\.")):
        net.bank_load(0, AdapterConfig(), {**state, key: torch.zeros(1, 1)})
    with pytest.raises(DomainMismatch, match="missing"):
        net.bank_load(0, AdapterConfig(), {k: v for k, v in state.items() if k != key})
    assert net.slots[0] is None  # a refused load leaves the slot empty
    with pytest.raises(KeyError, match="slot 0 is empty"):
        net(torch.randn(1, 3, 16, 16), torch.zeros(1, dtype=torch.long))


def test_bank_slots_are_reusable() -> None:
    torch.manual_seed(0)
    net = create_backbone("resnet26", width=0.125).eval()
    for name, kind in (("p", "parallel"), ("s", "series")):
        net.add_domain(name, AdapterConfig(kind=kind), 4)  # type: ignore[arg-type]
        randomise_domain(net, name, 3)
    net.enable_bank(1)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for name in ("p", "s", "p"):  # evict and reload through one slot, merged cache included
            net.bank_load(0, net.domains[name].config, net.domain_state(name))
            expected = net.forward_domain(x, name)
            assert relative_error(net.forward_merged(x, 0), expected) < difference_bound(net)
            assert relative_error(net(x, torch.zeros(2, dtype=torch.long)), expected) < difference_bound(net)


def test_mobilenet_pointwise_adapters_are_budgeted() -> None:
    net = create_backbone("mobilenet_v2")
    counts = net.domain_parameter_counts(AdapterConfig(), 10)
    share = (counts["adapter"] + counts["bn"]) / net.shared_parameter_count
    assert 0.03 < share < 0.15  # a domain stays about a tenth of the backbone
    spec = net.domain_spec(AdapterConfig(), 10)
    depthwise = [u.name for u in net.units if u.conv is not None and u.conv.groups > 1]
    assert depthwise and not any(k.startswith(f"{d}.adapter") for d in depthwise for k in spec)


def test_a_spec_the_bank_cannot_hold_is_refused_and_every_accepted_one_loads() -> None:
    net = create_backbone("mobilenet_v2").eval()
    wide = AdapterConfig(pointwise_budget=1.0)
    assert net.domain_spec(wide, 4)  # without a bank (training) any budget is a layout
    net.add_domain("wide", wide, 4)
    net.enable_bank(1)  # the engine's bank: pointwise budget 0.1
    with pytest.raises(ValueError, match="does not fit this server's bank"):
        net.domain_spec(wide, 4)
    with pytest.raises(ValueError, match="does not fit this server's bank"):  # and before any copy
        net.bank_load(0, wide, dict(net.domain_state("wide")))
    assert net.slots[0] is None
    for i, budget in enumerate((0.02, 0.1)):  # up to the bank's budget: the spec builds and it loads
        config = AdapterConfig(pointwise_budget=budget)
        net.domain_spec(config, 4)
        net.add_domain(f"b{i}", config, 4)
        net.bank_load(0, config, dict(net.domain_state(f"b{i}")))


def test_unit_ranks_are_checked_against_the_units_and_the_bank() -> None:
    net = create_backbone("mobilenet_v2").eval()
    net.enable_bank(1)
    pointwise = next(u for u in net.units if u.adaptable and u.pointwise)
    square = next(u for u in net.units if u.adaptable and not u.pointwise)
    assert pointwise.conv is not None and square.conv is not None
    c_out, c_in = pointwise.conv.out_channels, pointwise.conv.in_channels
    bank_rank = pointwise_rank(c_out, c_in, 0.1)
    net.domain_spec(AdapterConfig(unit_ranks={pointwise.name: bank_rank}), 4)
    with pytest.raises(ValueError, match="does not fit this server's bank"):
        net.domain_spec(AdapterConfig(unit_ranks={pointwise.name: bank_rank + 1}), 4)
    widest = max(square.conv.out_channels, square.conv.in_channels)
    net.domain_spec(AdapterConfig(unit_ranks={square.name: widest}), 4)  # a shared SVD basis may reach it
    with pytest.raises(ValueError, match=r"exceeds max\(C_out, C_in\)"):
        net.domain_spec(AdapterConfig(unit_ranks={square.name: widest + 1}), 4)
    with pytest.raises(ValueError, match="take no adapter"):
        net.domain_spec(AdapterConfig(unit_ranks={"no.such.unit": 1}), 4)
