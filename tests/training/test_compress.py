"""SVD compression: exact at full rank, smaller at a budget, and its artifacts load like any other."""

from __future__ import annotations

import pytest
import torch

from model_artifacts import domain_artifact
from residual_adapters import AdapterConfig, MultiDomainNet, create_backbone
from tests.numerics import difference_bound, relative_error
from tests.training.conftest import provenance, tiny_net
from training.compress import CompressionError, compress_domains
from training.data import DomainData


def _randomise(net: MultiDomainNet, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in net.domain_state(name).items():
            if key.endswith(("running_var", "bn.weight")):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def _two_domains(net: MultiDomainNet) -> MultiDomainNet:
    net.eval()
    for i, name in enumerate(("a", "b")):
        net.add_domain(name, AdapterConfig(kind="parallel"), 5)
        _randomise(net, name, i)
    return net


def _output_difference(net: MultiDomainNet, name: str, compressed_name: str, size: int = 16) -> float:
    """Relative difference of the two domains' logits: a lossless compression leaves only the rounding of
    two paths (the SVD's reconstruction is one more product per adapter, inside the same budget)."""
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return relative_error(net.forward_domain(x, compressed_name), net.forward_domain(x, name))


@pytest.mark.parametrize("shared_basis", [False, True])
def test_full_rank_is_lossless(shared_basis: bool) -> None:
    net = _two_domains(tiny_net())
    report = compress_domains(net, ["a", "b"], energy=1.0, shared_basis=shared_basis)
    for name, compressed in report.domains.items():
        assert compressed.config.kind == "lowrank"
        assert set(compressed.ranks) == {
            k.removesuffix(".adapter.weight") for k in net.domain_state(name) if k.endswith(".adapter.weight")
        }
        net.load_domain(f"{name}_c", compressed.config, compressed.tensors)
        assert _output_difference(net, name, f"{name}_c") < difference_bound(net)


def test_torchvision_pointwise_factors_are_retruncated_losslessly() -> None:
    net = create_backbone("mobilenet_v2")  # random weights: the structure is what matters here
    net.eval()
    net.add_domain("a", AdapterConfig(kind="parallel"), 5)
    _randomise(net, "a", 0)
    report = compress_domains(net, ["a"], energy=1.0)
    compressed = report.domains["a"]
    spec = net.domain_spec(AdapterConfig(kind="parallel"), 5)
    for unit, rank in compressed.ranks.items():
        if f"{unit}.adapter.u" in spec:  # a 1x1 unit already stored low-rank: never above its stored rank
            assert rank <= spec[f"{unit}.adapter.u"][0][1]
    net.load_domain("a_c", compressed.config, compressed.tensors)
    assert _output_difference(net, "a", "a_c", size=32) < difference_bound(net)


def test_budget_halves_the_adapter_and_keeps_the_dominant_directions() -> None:
    net = _two_domains(tiny_net())
    report = compress_domains(net, ["a", "b"], budget=0.5)
    assert report.parameters_after <= 0.5 * report.parameters_before
    assert report.parameters_after > 0.3 * report.parameters_before
    tight = compress_domains(net, ["a", "b"], energy=0.99)
    loose = compress_domains(net, ["a", "b"], energy=0.5)
    assert loose.parameters_after < tight.parameters_after
    # A low-rank matrix is found exactly by energy: plant a rank-2 adapter and ask for 99.99%.
    with torch.no_grad():
        state = net.domain_state("a")
        key = next(k for k in state if k.endswith(".adapter.weight") and min(state[k].shape) >= 8)
        g = torch.Generator().manual_seed(3)
        c_out, c_in = state[key].shape
        state[key].copy_(torch.randn(c_out, 2, generator=g) @ torch.randn(2, c_in, generator=g))
    planted = compress_domains(net, ["a"], energy=0.9999)
    assert planted.domains["a"].ranks[key.removesuffix(".adapter.weight")] == 2


def test_shared_basis_counts_the_basis_once() -> None:
    net = _two_domains(tiny_net())
    report = compress_domains(net, ["a", "b"], budget=0.5, shared_basis=True)
    assert report.unique_parameters < report.parameters_after
    ua = report.domains["a"].tensors
    ub = report.domains["b"].tensors
    key = next(k for k in ua if k.endswith(".adapter.u"))
    assert torch.equal(ua[key], ub[key])


def test_refusals(digits: DomainData) -> None:
    net = tiny_net()
    net.add_domain("s", AdapterConfig(kind="series"), 3)
    net.add_domain("b", AdapterConfig(kind="bn"), 3)
    net.add_domain("p", AdapterConfig(kind="parallel"), 3)
    with pytest.raises(CompressionError, match="series"):
        compress_domains(net, ["s"], energy=0.9)
    with pytest.raises(CompressionError, match="no adapters"):
        compress_domains(net, ["b"], energy=0.9)
    with pytest.raises(CompressionError, match="exactly one"):
        compress_domains(net, ["p"], energy=0.9, budget=0.5)
    with pytest.raises(CompressionError, match=r"\(0, 1\]"):
        compress_domains(net, ["p"], budget=1.5)


def test_compressed_artifact_validates_and_serves_from_the_bank(digits: DomainData) -> None:
    net = _two_domains(tiny_net())
    compressed = compress_domains(net, ["a"], budget=0.5).domains["a"]
    net.load_domain("a_svd", compressed.config, compressed.tensors)
    manifest, _tensor_bytes = domain_artifact(
        net,
        "a_svd",
        labels=list("vwxyz"),
        preprocessing=digits.preprocessing,
        provenance=provenance(),
        domain="a",
    )
    assert manifest.domain == "a" and manifest.adapter.kind == "lowrank"
    assert manifest.adapter.unit_ranks == compressed.ranks
    served = create_backbone("resnet26", width=0.125)
    served.load_shared_state_dict(net.shared_state_dict())
    served.eval()
    served.enable_bank(1)
    served.bank_load(0, compressed.config, compressed.tensors)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert relative_error(served.forward_slot(x, 0), net.forward_domain(x, "a_svd")) < difference_bound(
            net
        )


def test_the_bank_rank_cap_of_a_shared_basis_can_be_lifted() -> None:
    """Factored (low-rank) units: the shared basis is capped at one domain's stored rank for the bank; lifted,
    the stacked matrices' full rank is kept and full energy is lossless again."""
    net = tiny_net()
    net.eval()
    for i, name in enumerate(("a", "b")):
        net.add_domain(name, AdapterConfig(kind="lowrank", rank=2), 5)
        _randomise(net, name, i)
    capped = compress_domains(net, ["a", "b"], energy=1.0, shared_basis=True)
    lifted = compress_domains(net, ["a", "b"], energy=1.0, shared_basis=True, bank_rank_cap=False)
    assert max(capped.domains["a"].ranks.values()) == 2
    assert max(lifted.domains["a"].ranks.values()) > 2
    net.load_domain("a_lifted", lifted.domains["a"].config, lifted.domains["a"].tensors)
    assert _output_difference(net, "a", "a_lifted") < difference_bound(net)
