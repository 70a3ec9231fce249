"""The adapter bank's storage: the eval-mode tensors of resident domains, stacked over slots.

    UnitBank (one per DomainUnit)              HeadBank (the DomainHead)
      scale, shift      [slots, C]   folded BN    weight_<s> [K_s, F]  slot s's own classifier, at its own
      parallel          SlotMatrices              bias_<s>   [K_s]     class count (absent: empty slot)
      series            SlotMatrices (lazily)
      series_scale/shift [slots, C_out] its folded inner BN (lazily)
      depthwise         [slots, C, 1, kh, kw] kernel deltas (lazily, depthwise convs only)

    SlotMatrices: full `weight` [slots, C_out, C_in], or low-rank `u` [slots, C_out, r] @ `v` [slots, r, C_in]

Loading a domain copies its tensors into one slot (BN folded on the way); nothing here runs a forward
(the kernels that read the bank are in `kernels`, the merge math in `merge`). Storage only some domains
need (series adapters, depthwise deltas) is allocated when the first such domain arrives and released when
the last one leaves; heads are per slot, so one wide head never widens another slot's. All tensors are
non-persistent buffers: they follow `.to()` but stay out of `state_dict()` (and so out of the fingerprint).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from residual_adapters.adapters import BN_TENSORS, AdapterShape
from residual_adapters.merge import fold_bn


def _wide(t: Tensor) -> Tensor:
    """Fold BN in at least fp32, whatever the artifact's or the bank's dtype."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class SlotMatrices(nn.Module):
    """One 1x1 adapter matrix per slot: full, or low-rank with rank `rank` (smaller domains are zero-padded)."""

    def __init__(self, slots: int, c_out: int, c_in: int, rank: int | None, like: Tensor) -> None:
        super().__init__()
        self.rank = rank
        if rank is None:
            self.register_buffer("weight", like.new_zeros(slots, c_out, c_in), persistent=False)
        else:
            self.register_buffer("u", like.new_zeros(slots, c_out, rank), persistent=False)
            self.register_buffer("v", like.new_zeros(slots, rank, c_in), persistent=False)

    def buffer(self, name: str) -> Tensor:
        return self._buffers[name]  # type: ignore[return-value]

    def clear(self, slot: int) -> None:
        for t in self.buffers():
            t[slot].zero_()

    def store(self, slot: int, value: Tensor | tuple[Tensor, Tensor], rank: int | None, unit: str) -> None:
        """Copy one domain's matrix (full, or (u, v) of rank `rank`) into `slot`."""
        self.clear(slot)
        if self.rank is None:  # full storage: materialise low-rank factors
            self.buffer("weight")[slot].copy_(value[0] @ value[1] if isinstance(value, tuple) else value)
            return
        if not isinstance(value, tuple) or rank is None or rank > self.rank:
            raise ValueError(
                f"unit {unit}: the bank stores this 1x1 adapter at rank {self.rank}; "
                f"got {'a full matrix' if rank is None else f'rank {rank}'}"
            )
        self.buffer("u")[slot, :, :rank].copy_(value[0])
        self.buffer("v")[slot, :rank].copy_(value[1])

    def matrix(self, slot: int) -> Tensor:
        """One slot's adapter as a full [c_out, c_in] matrix."""
        if self.rank is None:
            return self.buffer("weight")[slot]
        return self.buffer("u")[slot] @ self.buffer("v")[slot]


class UnitBank(nn.Module):
    """One unit's slots: folded BN, a parallel adapter (if the unit is adaptable), series adapters and
    depthwise deltas while some resident domain has them."""

    scale: Tensor
    shift: Tensor
    series_scale: Tensor | None
    series_shift: Tensor | None
    depthwise: Tensor | None

    def __init__(
        self,
        unit: str,
        slots: int,
        like: Tensor,
        parallel: AdapterShape | None,
        series_rank: int | None,
        depthwise_shape: tuple[int, ...] | None = None,
    ) -> None:
        """`like`: the unit's base BN weight (device, dtype, channels); `parallel`: the parallel adapter
        storage shape (None: the unit takes no adapter); `series_rank`: the rank series adapters are stored
        at, if a series domain arrives (None: full matrices); `depthwise_shape`: the conv's kernel shape if
        it is depthwise (it can take a kernel delta), else None."""
        super().__init__()
        self.unit = unit
        self.series_rank = series_rank
        self.depthwise_shape = depthwise_shape
        self.register_buffer("scale", like.new_ones(slots, like.shape[0]), persistent=False)
        self.register_buffer("shift", like.new_zeros(slots, like.shape[0]), persistent=False)
        self.register_buffer("series_scale", None, persistent=False)
        self.register_buffer("series_shift", None, persistent=False)
        self.register_buffer("depthwise", None, persistent=False)
        self.parallel: SlotMatrices | None = None
        self.series: SlotMatrices | None = None
        self._series_slots: set[int] = set()
        self._depthwise_slots: set[int] = set()
        if parallel is not None:
            _, c_out, c_in, rank = parallel
            self.parallel = SlotMatrices(slots, c_out, c_in, rank, self.scale)

    @property
    def slots(self) -> int:
        return int(self.scale.shape[0])

    def _allocate_series(self, c_out: int) -> SlotMatrices:
        self.series = SlotMatrices(self.slots, c_out, c_out, self.series_rank, self.scale)
        self.series_scale = self.scale.new_zeros(self.slots, c_out)
        self.series_shift = self.scale.new_zeros(self.slots, c_out)
        return self.series

    def clear(self, slot: int) -> None:
        """Forget `slot`'s adapters; storage no remaining slot uses is released."""
        if self.parallel is not None:
            self.parallel.clear(slot)
        self._series_slots.discard(slot)
        if not self._series_slots:
            self.series, self.series_scale, self.series_shift = None, None, None
        elif self.series is not None:
            self.series.clear(slot)
        self._depthwise_slots.discard(slot)
        if not self._depthwise_slots:
            self.depthwise = None
        elif self.depthwise is not None:
            self.depthwise[slot].zero_()

    def load(
        self, slot: int, tensors: dict[str, Tensor], adapter: AdapterShape | None, base_bn: nn.BatchNorm2d
    ) -> None:
        """Copy one domain's tensors (names relative to the unit) into `slot`, folding its BN."""
        if "bn.weight" in tensors:
            scale, shift = self._fold(tensors, "bn", base_bn.eps)
        else:  # head-only domains keep the backbone's own statistics
            b = base_bn
            scale, shift = fold_bn(b.weight, b.bias, b.running_mean, b.running_var, eps=b.eps)  # type: ignore[arg-type]
        self.scale[slot].copy_(scale)
        self.shift[slot].copy_(shift)
        self.clear(slot)
        if "depthwise.weight" in tensors:
            self._store_depthwise(slot, tensors["depthwise.weight"])
        if adapter is None:
            return
        mode, c_out, _, rank = adapter
        if mode == "parallel":
            if self.parallel is None:
                raise ValueError(f"unit {self.unit} cannot take a parallel adapter in this bank")
            matrices = self.parallel
        else:
            matrices = self.series if self.series is not None else self._allocate_series(c_out)
        value = tensors["adapter.weight"] if rank is None else (tensors["adapter.u"], tensors["adapter.v"])
        matrices.store(slot, value, rank, self.unit)
        if mode == "series":
            assert self.series_scale is not None and self.series_shift is not None
            s, t = self._fold(tensors, "series_bn", base_bn.eps)
            self.series_scale[slot].copy_(s)
            self.series_shift[slot].copy_(t)
            self._series_slots.add(slot)

    def _store_depthwise(self, slot: int, delta: Tensor) -> None:
        if self.depthwise_shape is None or tuple(delta.shape) != self.depthwise_shape:
            raise ValueError(
                f"unit {self.unit} cannot take a depthwise delta of shape {tuple(delta.shape)} "
                f"(its conv takes {self.depthwise_shape or 'none'})"
            )
        if self.depthwise is None:
            self.depthwise = self.scale.new_zeros(self.slots, *self.depthwise_shape)
        self.depthwise[slot].copy_(delta)
        self._depthwise_slots.add(slot)

    @staticmethod
    def _fold(tensors: dict[str, Tensor], prefix: str, eps: float) -> tuple[Tensor, Tensor]:
        w, b, mean, var = (_wide(tensors[f"{prefix}.{k}"]) for k in BN_TENSORS)
        return fold_bn(w, b, mean, var, eps=eps)

    def series_terms(self, slot: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """A slot's series adapter with its folded inner BN, (A, s', t'), if the unit stores series adapters."""
        if self.series is None:
            return None
        assert self.series_scale is not None and self.series_shift is not None
        return self.series.matrix(slot), self.series_scale[slot], self.series_shift[slot]

    def depthwise_delta(self, slot: int) -> Tensor | None:
        """A slot's depthwise kernel delta [C, 1, kh, kw], if its domain has one here."""
        if self.depthwise is None or slot not in self._depthwise_slots:
            return None
        return self.depthwise[slot]


class HeadBank(nn.Module):
    """Every slot's classifier at its own class count, one weight and bias per slot: a wide head costs its
    own slot only, and nothing is left sized for it once it is cleared. Kernels assemble a mixed batch's
    logits from each row group's own head (`kernels.mixed_logits`)."""

    anchor: Tensor

    def __init__(self, slots: int, in_features: int, like: Tensor) -> None:
        super().__init__()
        self.in_features = in_features
        self.slots = slots
        # An empty tensor that carries the bank's device and dtype through `.to()` for heads loaded later.
        self.register_buffer("anchor", like.new_zeros(0), persistent=False)
        for slot in range(slots):
            self.register_buffer(f"weight_{slot}", None, persistent=False)
            self.register_buffer(f"bias_{slot}", None, persistent=False)

    def weight(self, slot: int) -> Tensor:
        return self._head(slot)[0]

    def bias(self, slot: int) -> Tensor:
        return self._head(slot)[1]

    def _head(self, slot: int) -> tuple[Tensor, Tensor]:
        w, b = self._buffers.get(f"weight_{slot}"), self._buffers.get(f"bias_{slot}")
        if w is None or b is None:
            raise KeyError(f"bank slot {slot} has no head")
        return w, b

    def classes(self, slot: int) -> int:
        """Slot's class count (0: empty)."""
        w = self._buffers.get(f"weight_{slot}")
        return 0 if w is None else int(w.shape[0])

    @property
    def max_classes(self) -> int:
        """The widest resident head's class count: what a mixed batch's logits are padded to."""
        return max((self.classes(s) for s in range(self.slots)), default=0)

    def load(self, slot: int, weight: Tensor, bias: Tensor) -> None:
        if not 0 <= slot < self.slots:
            raise IndexError(f"head bank slot {slot} out of range 0..{self.slots - 1}")
        a = self.anchor
        self._buffers[f"weight_{slot}"] = weight.to(a.device, a.dtype, copy=True).contiguous()
        self._buffers[f"bias_{slot}"] = bias.to(a.device, a.dtype, copy=True).contiguous()

    def clear(self, slot: int) -> None:
        self._buffers[f"weight_{slot}"] = None
        self._buffers[f"bias_{slot}"] = None
