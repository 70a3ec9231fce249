"""Domain units: the places where a shared backbone meets per-domain parameters.

`DomainUnit` wraps one shared conv (frozen) and the BN that follows it; `DomainHead` replaces the
classifier. Each keeps its domains' trainable modules (`domains[name]`, for training and as the reference)
and, once `enable_bank` is called, the adapter bank's storage for it (`bank`, see `bank`), and dispatches
each forward on the plan of the current call (see `plan`):

    BasePlan    shared conv, base BN               (head: the imported classifier)
    DomainPlan  shared conv + the domain's modules (head: the domain's linear)
    SlotPlan    shared conv + bank kernels, one slot
    MixedPlan   shared conv + bank kernels, per-row slots (a depthwise conv with deltas: each row's kernel)
    MergedPlan  one conv with the slot's folded weights (see `merge`)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from residual_adapters import kernels
from residual_adapters.adapters import AdapterShape, DomainUnitParams
from residual_adapters.bank import HeadBank, UnitBank
from residual_adapters.config import pointwise_rank
from residual_adapters.merge import merge_conv
from residual_adapters.plan import (
    BasePlan,
    DomainPlan,
    ForwardPlan,
    ForwardPlanError,
    MergedConv,
    MergedPlan,
    MixedPlan,
    SlotPlan,
    current_plan,
)


class CentreTapConv(torch.autograd.Function):
    """conv(x, W + A at the centre tap) for a frozen W: the parallel adapter's training path.

    Forward is one convolution (no separate 1x1 conv and add); backward computes the input gradient and,
    for A, only the centre tap's weight gradient: a 1x1 weight gradient, 1/9 of a 3x3 one. Computing A*x
    as its own 1x1 conv cost as much again on the CPU (memory-bound 1x1 kernels), which left adapter
    training barely cheaper than fine-tuning.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, adapter: Tensor, conv: nn.Conv2d) -> Tensor:
        weight = conv.weight.detach().clone()
        weight[:, :, weight.shape[2] // 2, weight.shape[3] // 2] += adapter
        ctx.save_for_backward(x, weight)
        ctx.conv = conv
        return F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, weight = ctx.saved_tensors
        c: nn.Conv2d = ctx.conv
        conv_backward = torch.ops.aten.convolution_backward
        grad_x = grad_a = None
        if ctx.needs_input_grad[0]:
            grad_x = conv_backward(
                grad,
                x,
                weight,
                None,
                c.stride,
                c.padding,
                c.dilation,
                False,
                [0, 0],
                c.groups,
                [True, False, False],
            )[0]
        if ctx.needs_input_grad[1]:
            s = c.stride[0]
            centre = x[:, :, ::s, ::s] if s != 1 else x
            tap = weight[:, :, :1, :1]  # only its shape matters: the gradient of a 1x1 kernel
            grad_a = conv_backward(
                grad, centre, tap, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False]
            )[1]
            grad_a = grad_a[:, :, 0, 0]
        return grad_x, grad_a, None


class DomainUnit(nn.Module):
    """A shared conv (or none: a BN-only unit) followed by domain-specific BN and an optional adapter."""

    def __init__(self, conv: nn.Conv2d | None, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv = conv
        self.base_bn = bn
        self.channels = bn.num_features
        self.name = ""  # set by MultiDomainNet
        self.domains = nn.ModuleDict()
        self.bank: UnitBank | None = None
        for p in self.shared_parameters():
            p.requires_grad_(False)

    # -- structure ---------------------------------------------------------------------------------
    def shared_parameters(self) -> list[nn.Parameter]:
        params = list(self.base_bn.parameters())
        return params + (list(self.conv.parameters()) if self.conv is not None else [])

    @property
    def adaptable(self) -> bool:
        """Whether a 1x1 adapter fits this conv: dense (groups 1), 'same' padding so it folds into the centre tap."""
        c = self.conv
        if c is None or c.groups != 1 or isinstance(c.padding, str):
            return False
        return all(
            p == d * (k - 1) // 2 and k % 2 == 1
            for p, d, k in zip(c.padding, c.dilation, c.kernel_size, strict=True)
        )

    @property
    def depthwise(self) -> bool:
        """Whether the conv is depthwise (groups = C_in > 1): it can take a kernel delta of its own shape."""
        c = self.conv
        return c is not None and c.groups > 1 and c.groups == c.in_channels

    @property
    def pointwise(self) -> bool:
        return self.conv is not None and tuple(self.conv.kernel_size) == (1, 1)

    @property
    def stride(self) -> int:
        return 1 if self.conv is None else int(self.conv.stride[0])

    def _centre(self, x: Tensor) -> Tensor:
        """The input pixels under the centre tap of each output position (what a strided 1x1 conv sees)."""
        s = self.stride
        return x if s == 1 else x[:, :, ::s, ::s]

    def add_domain(
        self, name: str, *, domain_bn: bool, adapter: AdapterShape | None, depthwise: bool = False
    ) -> None:
        if depthwise and not self.depthwise:
            raise ValueError(f"unit {self.name} is not a depthwise conv: it takes no depthwise delta")
        self.domains[name] = DomainUnitParams(
            self.channels,
            self.base_bn,
            domain_bn=domain_bn,
            adapter=adapter,
            depthwise=self._kernel_shape if depthwise else None,
        )

    @property
    def _kernel_shape(self) -> tuple[int, ...]:
        assert self.conv is not None
        return tuple(self.conv.weight.shape)

    # -- dispatch -----------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        plan: ForwardPlan = current_plan(self.name)
        if isinstance(plan, BasePlan):
            return self._base_bn(self._conv(x))
        if isinstance(plan, DomainPlan):
            return self._forward_domain(x, plan.domain)
        if isinstance(plan, SlotPlan | MixedPlan):
            return self._forward_bank(x, plan)
        if isinstance(plan, MergedPlan):
            return self._forward_merged(x, plan)
        raise ForwardPlanError(f"unit {self.name}: {plan!r} is not a forward plan")

    def _base_bn(self, y: Tensor) -> Tensor:
        b = self.base_bn  # always eval statistics: shared weights never change
        return F.batch_norm(y, b.running_mean, b.running_var, b.weight, b.bias, False, 0.0, b.eps)

    def _conv(self, x: Tensor) -> Tensor:
        return x if self.conv is None else self.conv(x)

    # -- trainable domains --------------------------------------------------------------------------
    def _forward_domain(self, x: Tensor, domain: str) -> Tensor:
        if domain not in self.domains:
            raise ForwardPlanError(
                f"unit {self.name} has no domain {domain!r}; known: {sorted(self.domains)}"
            )
        p = self.domains[domain]
        assert isinstance(p, DomainUnitParams)
        if p.depthwise is not None:
            c = self.conv
            assert c is not None
            y = F.conv2d(x, c.weight + p.depthwise.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
        elif p.adapter is None:
            y = self._conv(x)
        elif p.series_bn is not None:
            y = self._conv(x)
            y = y + p.adapter(p.series_bn(y))
        elif self._fuses_adapter:
            assert self.conv is not None
            y = CentreTapConv.apply(x, p.adapter.matrix(), self.conv)
        else:
            y = self._conv(x) + p.adapter(self._centre(x))
        return p.bn(y) if p.bn is not None else self._base_bn(y)

    @property
    def _fuses_adapter(self) -> bool:
        """Whether a parallel adapter runs folded into a frozen k>1 kernel's centre tap (see CentreTapConv)."""
        c = self.conv
        return c is not None and not c.weight.requires_grad and not self.pointwise and self.adaptable

    # -- adapter bank -------------------------------------------------------------------------------
    def enable_bank(self, slots: int, parallel: AdapterShape | None, pointwise_budget: float) -> None:
        """Allocate `slots` rows of folded BN and (if adaptable) parallel adapter storage, all zero."""
        # series adapters (C_out x C_out) on a 1x1 conv are stored low-rank within the budget too
        series_rank = (
            pointwise_rank(self.channels, self.channels, pointwise_budget) if self.pointwise else None
        )
        depthwise_shape = self._kernel_shape if self.depthwise else None
        self.bank = UnitBank(self.name, slots, self.base_bn.weight, parallel, series_rank, depthwise_shape)

    def _require_bank(self) -> UnitBank:
        if self.bank is None:
            raise ForwardPlanError(f"unit {self.name} has no adapter bank (MultiDomainNet.enable_bank first)")
        return self.bank

    def bank_load(self, slot: int, tensors: dict[str, Tensor], adapter: AdapterShape | None) -> None:
        """Copy one domain's tensors (names relative to this unit) into `slot`, folding its BN."""
        self._require_bank().load(slot, tensors, adapter, self.base_bn)

    def bank_clear(self, slot: int) -> None:
        """Forget `slot`'s adapters (storage no slot uses any more is released)."""
        self._require_bank().clear(slot)

    def _forward_bank(self, x: Tensor, plan: SlotPlan | MixedPlan) -> Tensor:
        bank = self._require_bank()
        # y is a fresh conv output either way: safe to update in place (inference only)
        if self._runs_depthwise_deltas(bank, plan):
            assert self.conv is not None and bank.depthwise is not None
            y = kernels.depthwise_conv(x, self.conv, bank.depthwise, plan)
        else:
            y = kernels.as_nhwc(self._conv(x))
        if bank.parallel is not None:
            kernels.add_adapter(y, self._centre(x), bank.parallel, plan)
        if plan.series and bank.series is not None:
            assert bank.series_scale is not None and bank.series_shift is not None
            t = torch.addcmul(
                kernels.per_row(bank.series_shift, plan), y, kernels.per_row(bank.series_scale, plan)
            )
            kernels.add_adapter(y, t, bank.series, plan)
        # The folded BN is written over y where y is this unit's own fresh output (without a conv it may be
        # x itself): a new tensor per unit is memory fresh from the allocator, whose first touch can
        # page-fault when batch sizes vary (as they do under load).
        out = y if self.conv is not None and not y.requires_grad else None
        return torch.addcmul(kernels.per_row(bank.shift, plan), y, kernels.per_row(bank.scale, plan), out=out)

    @staticmethod
    def _runs_depthwise_deltas(bank: UnitBank, plan: SlotPlan | MixedPlan) -> bool:
        if not plan.depthwise or bank.depthwise is None:
            return False
        return not isinstance(plan, SlotPlan) or bank.depthwise_delta(plan.slot) is not None

    def merge(self, slot: int) -> MergedConv:
        """This unit's weights for `slot` with its adapters in the centre tap (or its depthwise delta in the
        kernel) and its BN folded in."""
        bank = self._require_bank()
        parallel = bank.parallel.matrix(slot) if bank.parallel is not None else None
        return merge_conv(
            self.conv,
            bank.scale[slot],
            bank.shift[slot],
            parallel,
            bank.series_terms(slot),
            bank.depthwise_delta(slot),
        )

    def _forward_merged(self, x: Tensor, plan: MergedPlan) -> Tensor:
        if self not in plan.weights:
            raise ForwardPlanError(
                f"unit {self.name}: the merged plan for slot {plan.slot} has no weights for this unit "
                "(it was made for another network)"
            )
        w, b = plan.weights[self]
        if self.conv is None:
            return x * w[:, None, None] + b[:, None, None]
        c = self.conv
        return F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)


class DomainHead(nn.Module):
    """Per-domain linear classifier; any number of classes per domain."""

    def __init__(self, in_features: int, base: nn.Linear | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.domains = nn.ModuleDict()
        self.base = base  # the imported network's own classifier, used by the plain-backbone path
        if base is not None:
            base.requires_grad_(False)
        self.bank: HeadBank | None = None

    def add_domain(self, name: str, num_classes: int) -> None:
        head = nn.Linear(self.in_features, num_classes)
        nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)
        self.domains[name] = head

    def enable_bank(self, slots: int, like: Tensor) -> None:
        """`slots` empty heads on `like`'s device and dtype; each slot's head has its own class count."""
        self.bank = HeadBank(slots, self.in_features, like)

    def _require_bank(self) -> HeadBank:
        if self.bank is None:
            raise ForwardPlanError("head has no adapter bank (MultiDomainNet.enable_bank first)")
        return self.bank

    def bank_load(self, slot: int, weight: Tensor, bias: Tensor) -> None:
        self._require_bank().load(slot, weight, bias)

    def bank_clear(self, slot: int) -> None:
        self._require_bank().clear(slot)

    def forward(self, x: Tensor) -> Tensor:
        plan: ForwardPlan = current_plan("head")
        if isinstance(plan, BasePlan):
            return x if self.base is None else self.base(x)
        if isinstance(plan, DomainPlan):
            if plan.domain not in self.domains:
                raise ForwardPlanError(f"head has no domain {plan.domain!r}; known: {sorted(self.domains)}")
            return self.domains[plan.domain](x)  # type: ignore[no-any-return]
        if isinstance(plan, SlotPlan | MergedPlan):
            return kernels.slot_logits(self._require_bank(), x, plan.slot)
        if isinstance(plan, MixedPlan):
            return kernels.mixed_logits(self._require_bank(), x, plan.segments)
        raise ForwardPlanError(f"head: {plan!r} is not a forward plan")
