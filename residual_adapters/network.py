"""`MultiDomainNet`: one frozen backbone, many domains.

The architecture (`body`) is an ordinary module whose conv+BN pairs are `DomainUnit`s and whose classifier
is a `DomainHead`. Each forward method makes one immutable plan (see `plan`) and runs the body under it:

- `forward_domain(x, name)`: one domain's trainable modules (training, reference)      DomainPlan;
- `forward(x, domain_index)`: the adapter bank, every row its own slot (mixed batches)   MixedPlan;
- `forward_slot(x, slot)`: one bank slot, unmerged                                      SlotPlan;
- `forward_merged(x, slot)`: one slot's folded weights, at the plain backbone's cost      MergedPlan;
- `forward_base(x)`: the plain backbone, base BN and its own classifier if it was imported with one  BasePlan.

Forwards may run on several threads at once. Changing the network (domains, bank loads, merges) may not
run concurrently with forwards that use what it changes; the server's engine serialises those.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import Tensor, nn

from residual_adapters import kernels
from residual_adapters.adapters import BN_TENSORS, AdapterShape, is_adapter_tensor
from residual_adapters.bank import HeadBank, UnitBank
from residual_adapters.config import AdapterConfig, pointwise_rank, select_units
from residual_adapters.plan import (
    BasePlan,
    DomainPlan,
    MergedConv,
    MergedPlan,
    MixedPlan,
    MixedStrategy,
    Segment,
    SlotPlan,
    running,
)
from residual_adapters.units import DomainHead, DomainUnit

TensorSpec = tuple[tuple[int, ...], str]
"""(shape, dtype) of one domain tensor: the domain spec is data, so the store can check it without torch.nn."""


@dataclass(frozen=True)
class DomainInfo:
    config: AdapterConfig
    num_classes: int


class DomainMismatch(ValueError):
    """Domain tensors that do not fit this backbone (names, shapes) or a bank that cannot hold them."""


class MultiDomainNet(nn.Module):
    def __init__(self, body: nn.Module, architecture: dict[str, Any]) -> None:
        super().__init__()
        self.body = body
        self.architecture = architecture
        """{"name": registry name, "kwargs": structural arguments}: enough to rebuild the body."""
        self.units: list[DomainUnit] = []
        heads: list[DomainHead] = []
        for name, module in body.named_modules():
            if isinstance(module, DomainUnit):
                module.name = name
                self.units.append(module)
            elif isinstance(module, DomainHead):
                heads.append(module)
        if len(heads) != 1:
            raise ValueError(f"a body needs exactly one DomainHead, found {len(heads)}")
        self.head = heads[0]
        self.domains: dict[str, DomainInfo] = {}
        self.slots: list[DomainInfo | None] = []
        self.bank_budget: float | None = None
        """The bank's pointwise budget (`enable_bank`): the largest 1x1 adapter rank each slot stores."""
        self.mixed_strategy: Literal["auto"] | MixedStrategy = "auto"
        """How bank forwards apply adapters: per-domain GEMMs over slot-sorted rows (segments, best on
        CPU), or a per-row gather + one batched GEMM per layer (gather, fewer kernel launches on GPU).
        auto picks segments on CPU and gather elsewhere."""
        self._merged: dict[int, MappingProxyType[nn.Module, MergedConv]] = {}
        """slot -> every unit's folded weights; each entry complete before it is published (see merge)."""

    # -- shared weights -----------------------------------------------------------------------------
    def shared_state_dict(self) -> dict[str, Tensor]:
        """The frozen weights (convs and base BN), in a stable order; what a backbone artifact stores."""
        return {
            k: v
            for k, v in self.body.state_dict().items()
            if ".domains." not in f".{k}" and not k.endswith("num_batches_tracked")
        }

    def load_shared_state_dict(self, tensors: dict[str, Tensor]) -> None:
        expected = self.shared_state_dict()
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or extra:
            raise DomainMismatch(
                f"shared weights do not fit {self.architecture['name']}: missing {missing[:5]}, extra {extra[:5]}"
            )
        with torch.no_grad():
            for k, v in expected.items():
                if tuple(tensors[k].shape) != tuple(v.shape):
                    raise DomainMismatch(
                        f"shared tensor {k}: shape {tuple(tensors[k].shape)}, expected {tuple(v.shape)}"
                    )
                v.copy_(tensors[k])

    def fingerprint(self) -> str:
        """sha256 of the architecture and every shared tensor: ties artifacts to the exact weights they were trained on."""
        h = hashlib.sha256(json.dumps(self.architecture, sort_keys=True).encode())
        for k, v in sorted(self.shared_state_dict().items()):
            t = v.detach().to("cpu", torch.float32).contiguous()
            h.update(f"{k}:{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    @property
    def shared_parameter_count(self) -> int:
        return sum(v.numel() for k, v in self.shared_state_dict().items() if "running_" not in k)

    # -- domain layout ------------------------------------------------------------------------------
    def adaptable_units(self) -> list[str]:
        return [u.name for u in self.units if u.adaptable]

    def depthwise_units(self) -> list[str]:
        """Units whose conv is depthwise: where kind `depthwise` puts its kernel deltas, in depth order."""
        return [u.name for u in self.units if u.depthwise]

    def unit_depthwise(self, unit: DomainUnit, config: AdapterConfig) -> bool:
        """Whether `unit` gets a depthwise kernel delta for `config`."""
        if not config.has_depthwise or not unit.depthwise:
            return False
        names = self.depthwise_units()
        if isinstance(config.allocation, list):
            return unit.name in config.allocation
        return unit.name in select_units(config.allocation, names)

    def unit_adapter(self, unit: DomainUnit, config: AdapterConfig) -> AdapterShape | None:
        """Where and how big the adapter at `unit` is for `config` (None: BN only)."""
        if not config.has_adapters or not unit.adaptable or unit.name not in self._selected(config):
            return None
        assert unit.conv is not None
        mode = "series" if config.kind == "series" else "parallel"
        c_out = unit.conv.out_channels
        c_in = c_out if mode == "series" else unit.conv.in_channels
        rank: int | None = None
        if unit.name in config.unit_ranks:
            rank = config.unit_ranks[unit.name]
        elif unit.pointwise:  # a low-rank domain's 1x1 adapters never exceed the pointwise budget
            rank = pointwise_rank(c_out, c_in, config.pointwise_budget)
            if config.kind == "lowrank":
                rank = min(rank, int(config.rank or rank))
        elif config.kind == "lowrank":
            rank = config.rank
        return (mode, c_out, c_in, rank)

    def _selected(self, config: AdapterConfig) -> set[str]:
        allocation = config.allocation
        if isinstance(allocation, list) and config.has_depthwise:  # a list may name depthwise units too
            depthwise = set(self.depthwise_units())
            allocation = [name for name in allocation if name not in depthwise]
        return select_units(allocation, self.adaptable_units())

    def check_ranks(self, config: AdapterConfig) -> None:
        """Raise ValueError for adapter ranks this network cannot hold: `unit_ranks` naming a unit that takes
        no adapter or above max(C_out, C_in) (SVD compression's shared basis spans C_out: it may pass
        min(C_out, C_in), never both dimensions), and, once a bank is enabled,
        any 1x1 adapter above the rank the bank stores for that conv (`bank_load` would refuse it)."""
        adaptable = {u.name: u for u in self.units if u.adaptable}
        unknown = sorted(set(config.unit_ranks) - set(adaptable))
        if unknown:
            raise ValueError(f"unit_ranks names units that take no adapter: {unknown[:10]}")
        for unit in self.units:
            shape = self.unit_adapter(unit, config)
            if shape is None:
                continue
            _, c_out, c_in, rank = shape
            if rank is None:  # a full matrix: the bank stores any
                continue
            if unit.name in config.unit_ranks and rank > max(c_out, c_in):
                raise ValueError(
                    f"unit_ranks[{unit.name!r}] = {rank} exceeds max(C_out, C_in) = {max(c_out, c_in)}"
                )
            if self.bank_budget is not None and unit.pointwise:
                bank_rank = pointwise_rank(c_out, c_in, self.bank_budget)
                if rank > bank_rank:
                    raise ValueError(
                        f"unit {unit.name}: a 1x1 adapter of rank {rank} does not fit this server's bank, "
                        f"which stores rank {bank_rank} there (its pointwise_budget is {self.bank_budget:g}; "
                        f"this domain's is {config.pointwise_budget:g})"
                    )

    def domain_spec(self, config: AdapterConfig, num_classes: int) -> dict[str, TensorSpec]:
        """Exact names, shapes and dtypes of every tensor of a domain with this config; ValueError for
        ranks the network (or its bank, once enabled) cannot hold (`check_ranks`)."""
        self.check_ranks(config)
        spec: dict[str, TensorSpec] = {}
        for unit in self.units:
            if config.has_domain_bn:
                for k in BN_TENSORS:
                    spec[f"{unit.name}.bn.{k}"] = ((unit.channels,), "float32")
            shape = self.unit_adapter(unit, config)
            if shape is None:
                continue
            mode, c_out, c_in, rank = shape
            if rank is None:
                spec[f"{unit.name}.adapter.weight"] = ((c_out, c_in), "float32")
            else:
                spec[f"{unit.name}.adapter.u"] = ((c_out, rank), "float32")
                spec[f"{unit.name}.adapter.v"] = ((rank, c_in), "float32")
            if mode == "series":
                for k in BN_TENSORS:
                    spec[f"{unit.name}.series_bn.{k}"] = ((c_out,), "float32")
        for unit in self.units:  # after the adapters: a spec lists them in a stable, readable order
            if self.unit_depthwise(unit, config):
                assert unit.conv is not None
                spec[f"{unit.name}.depthwise.weight"] = (tuple(unit.conv.weight.shape), "float32")
        spec["head.weight"] = ((num_classes, self.head.in_features), "float32")
        spec["head.bias"] = ((num_classes,), "float32")
        return spec

    # -- trainable domains --------------------------------------------------------------------------
    def add_domain(self, name: str, config: AdapterConfig, num_classes: int) -> None:
        """A new trainable domain, starting as the base network (zero adapters, base BN statistics)."""
        if name in self.domains:
            raise ValueError(f"domain {name!r} already exists")
        device = next(self.body.parameters()).device
        for unit in self.units:
            unit.add_domain(
                name,
                domain_bn=config.has_domain_bn,
                adapter=self.unit_adapter(unit, config),
                depthwise=self.unit_depthwise(unit, config),
            )
        self.head.add_domain(name, num_classes)
        self.domains[name] = DomainInfo(config, num_classes)
        self.to(device)
        self.train(self.training)  # new modules follow the network's train/eval mode

    def remove_domain(self, name: str) -> None:
        self._require(name)
        for unit in self.units:
            del unit.domains[name]
        del self.head.domains[name]
        del self.domains[name]

    def _require(self, name: str) -> DomainInfo:
        if name not in self.domains:
            raise KeyError(f"unknown domain {name!r}; known: {sorted(self.domains)}")
        return self.domains[name]

    def domain_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """The trainable tensors of one domain, by spec name (what an optimiser gets)."""
        return {
            k: v
            for k, v in self._domain_tensors(name, params_only=True).items()
            if isinstance(v, nn.Parameter)
        }

    def domain_state(self, name: str) -> dict[str, Tensor]:
        """One domain's tensors by spec name: exactly what an artifact stores."""
        return {k: v.detach() for k, v in self._domain_tensors(name, params_only=False).items()}

    def _domain_tensors(self, name: str, *, params_only: bool) -> dict[str, Tensor]:
        self._require(name)
        out: dict[str, Tensor] = {}
        for unit in self.units:
            module = unit.domains[name]
            items = module.named_parameters() if params_only else module.state_dict(keep_vars=True).items()
            for k, v in items:
                if not k.endswith("num_batches_tracked"):
                    out[f"{unit.name}.{k}"] = v
        head = self.head.domains[name]
        assert isinstance(head, nn.Linear)
        out["head.weight"], out["head.bias"] = head.weight, head.bias
        return out

    def load_domain(self, name: str, config: AdapterConfig, tensors: dict[str, Tensor]) -> None:
        """Add a trainable domain with the given tensors (checked against the spec)."""
        num_classes = int(tensors["head.bias"].shape[0]) if "head.bias" in tensors else -1
        check_tensors(self.domain_spec(config, max(num_classes, 0)), tensors)
        self.add_domain(name, config, num_classes)
        with torch.no_grad():
            for k, v in self._domain_tensors(name, params_only=False).items():
                v.copy_(tensors[k])

    # -- forward paths ------------------------------------------------------------------------------
    def forward_domain(self, x: Tensor, name: str) -> Tensor:
        self._require(name)
        with running(DomainPlan(name)):
            return self.body(x)  # type: ignore[no-any-return]

    def forward_base(self, x: Tensor) -> Tensor:
        with running(BasePlan()):
            return self.body(x)  # type: ignore[no-any-return]

    @torch.no_grad()
    def forward(self, x: Tensor, domain_index: Tensor) -> Tensor:
        """Mixed-domain forward through the bank (inference only): row i uses slot domain_index[i].

        Returns [B, K_max] logits (K_max: the widest resident head), classes beyond a row's own count set
        to -inf (`padding_mask` says which). Shared convs run once over the whole batch; rows are sorted by
        slot once, so each domain's adapters cost one GEMM per layer over its run of rows, and the logits
        are put back in the caller's order at the end.
        """
        order = torch.argsort(domain_index, stable=True)
        sorted_index = domain_index[order]
        slots, counts = torch.unique_consecutive(sorted_index, return_counts=True)
        segments, start = [], 0
        for slot, count in zip(slots.tolist(), counts.tolist(), strict=True):  # one host sync per batch
            self._slot(slot)
            segments.append(Segment(slot, start, start + count))
            start += count
        if len(segments) == 1:
            return self._pad(self.forward_slot(x, segments[0].slot))
        configs = [self._slot(s.slot).config for s in segments]
        plan = MixedPlan(
            sorted_index,
            tuple(segments),
            series=any(c.kind == "series" for c in configs),
            strategy=self._strategy(x),
            depthwise=any(c.has_depthwise for c in configs),
        )
        with running(plan):
            logits = self.body(x[order])
        out = torch.empty_like(logits)
        out[order] = logits
        return out

    def _strategy(self, x: Tensor) -> MixedStrategy:
        if self.mixed_strategy == "auto":
            return "segments" if x.device.type == "cpu" else "gather"
        return self.mixed_strategy

    def _pad(self, logits: Tensor) -> Tensor:
        k_max = self._head_bank().max_classes
        return torch.nn.functional.pad(logits, (0, k_max - logits.shape[1]), value=float("-inf"))

    def padding_mask(self, domain_index: Tensor, width: int) -> Tensor:
        """[B, width] bool, True in the columns of `forward`'s logits beyond row i's own class count (slot
        domain_index[i]): the one place that knows which columns are a row's classes."""
        head = self._head_bank()
        classes = torch.tensor([head.classes(s) for s in range(head.slots)], device=domain_index.device)
        return kernels.class_padding_mask(classes[domain_index], width)

    @torch.no_grad()
    def forward_slot(self, x: Tensor, slot: int) -> Tensor:
        """A single-domain batch through the bank, unmerged (inference only) -> [B, K]."""
        config = self._slot(slot).config
        plan = SlotPlan(
            slot, series=config.kind == "series", strategy=self._strategy(x), depthwise=config.has_depthwise
        )
        with running(plan):
            return self.body(x)  # type: ignore[no-any-return]

    def forward_merged(self, x: Tensor, slot: int) -> Tensor:
        """A single-domain batch through the slot's merged weights (see `merge`)."""
        self._slot(slot)
        weights = self._merged.get(slot)
        if weights is None:
            weights = self._merge(slot)
        with running(MergedPlan(slot, weights)):
            return self.body(x)  # type: ignore[no-any-return]

    # -- adapter bank -------------------------------------------------------------------------------
    def enable_bank(self, slots: int, pointwise_budget: float = 0.1) -> None:
        """Allocate an empty bank of `slots` domains. 1x1 convs store low-rank adapters up to the rank
        `pointwise_budget` gives; 3x3 convs store full matrices (low-rank domains are materialised)."""
        for unit in self.units:
            shape = None
            if unit.adaptable:
                assert unit.conv is not None
                c_out, c_in = unit.conv.out_channels, unit.conv.in_channels
                rank = pointwise_rank(c_out, c_in, pointwise_budget) if unit.pointwise else None
                shape = ("parallel", c_out, c_in, rank)
            unit.enable_bank(slots, shape, pointwise_budget)
        self.bank_budget = pointwise_budget
        self.head.enable_bank(slots, self.units[0].base_bn.weight)
        self.slots = [None] * slots
        self._merged.clear()

    def _head_bank(self) -> HeadBank:
        if self.head.bank is None:
            raise KeyError("the adapter bank is not enabled (enable_bank first)")
        return self.head.bank

    def _slot(self, slot: int) -> DomainInfo:
        if not 0 <= slot < len(self.slots) or self.slots[slot] is None:
            raise KeyError(f"bank slot {slot} is empty")
        return self.slots[slot]  # type: ignore[return-value]

    @torch.no_grad()
    def bank_load(self, slot: int, config: AdapterConfig, tensors: dict[str, Tensor]) -> None:
        """Copy one domain's tensors into a bank slot (validated against the spec first)."""
        if not 0 <= slot < len(self.slots):
            raise IndexError(f"bank slot {slot} out of range 0..{len(self.slots) - 1}")
        num_classes = int(tensors["head.bias"].shape[0]) if "head.bias" in tensors else 0
        check_tensors(self.domain_spec(config, num_classes), tensors)
        self._release(slot)  # a failure half-way leaves the slot empty, never half-loaded
        try:
            for unit in self.units:
                prefix = f"{unit.name}."
                own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
                unit.bank_load(slot, own, self.unit_adapter(unit, config))
            self.head.bank_load(slot, tensors["head.weight"], tensors["head.bias"])
        except BaseException:
            self._release(slot)
            raise
        self.slots[slot] = DomainInfo(config, num_classes)

    def bank_clear(self, slot: int) -> None:
        """Empty a slot; its head and any storage only it used are released (the bank shrinks back)."""
        self._slot(slot)
        self._release(slot)

    def _release(self, slot: int) -> None:
        self.slots[slot] = None
        self.unmerge(slot)
        for unit in self.units:
            unit.bank_clear(slot)
        self._head_bank().clear(slot)

    def load_domains_into_bank(self) -> dict[str, int]:
        """Copy every trainable domain into the bank, in order (domain i -> slot i)."""
        if len(self.slots) < len(self.domains):
            self.enable_bank(len(self.domains))
        mapping = {}
        for slot, (name, info) in enumerate(self.domains.items()):
            self.bank_load(slot, info.config, self.domain_state(name))
            mapping[name] = slot
        return mapping

    def merge(self, slot: int) -> None:
        """Fold slot's adapters into each conv's centre tap and its BN into weight and bias (kept until
        `unmerge`, a new `bank_load` into the slot, or `enable_bank`)."""
        self._slot(slot)
        self._merge(slot)

    @torch.no_grad()
    def _merge(self, slot: int) -> MappingProxyType[nn.Module, MergedConv]:
        weights = MappingProxyType({unit: unit.merge(slot) for unit in self.units})
        self._merged[slot] = weights  # published whole: a concurrent forward sees all units or none
        return weights

    def unmerge(self, slot: int) -> None:
        self._merged.pop(slot, None)

    # -- memory -------------------------------------------------------------------------------------
    def bank_bytes(self) -> int:
        """Bytes held by the adapter bank (all slots, empty or not)."""
        banks = [m for m in self.modules() if isinstance(m, UnitBank | HeadBank)]
        return sum(t.numel() * t.element_size() for bank in banks for t in bank.buffers())

    def merged_bytes(self) -> int:
        """Bytes held by merged (folded) weights."""
        return sum(
            t.numel() * t.element_size()
            for weights in list(self._merged.values())
            for pair in weights.values()
            for t in pair
        )

    # -- parameter counting -------------------------------------------------------------------------
    def domain_parameter_counts(self, config: AdapterConfig, num_classes: int) -> dict[str, int]:
        """Per-domain tensors by role (running statistics are not parameters)."""
        counts = {"adapter": 0, "bn": 0, "head": 0}
        for name, (shape, _) in self.domain_spec(config, num_classes).items():
            n = 1
            for d in shape:
                n *= d
            if "running_" in name:
                continue
            role = "head" if name.startswith("head.") else "adapter" if is_adapter_tensor(name) else "bn"
            counts[role] += n
        return counts

    def params_multiplier(self, n_domains: int, config: AdapterConfig, num_classes: int = 0) -> float:
        """The paper's '#params' column: total parameters for n domains over one backbone's (heads apart)."""
        c = self.domain_parameter_counts(config, num_classes)
        return (
            self.shared_parameter_count + n_domains * (c["adapter"] + c["bn"])
        ) / self.shared_parameter_count


def check_tensors(spec: dict[str, TensorSpec], tensors: dict[str, Tensor]) -> None:
    missing, extra = sorted(set(spec) - set(tensors)), sorted(set(tensors) - set(spec))
    if missing or extra:
        raise DomainMismatch(
            f"domain tensors do not match the spec: missing {missing[:5]}, extra {extra[:5]}"
        )
    for k, (shape, _) in spec.items():
        if tuple(tensors[k].shape) != shape:
            raise DomainMismatch(f"domain tensor {k}: shape {tuple(tensors[k].shape)}, expected {shape}")
