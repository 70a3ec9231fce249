"""Domain units: the places where a shared backbone meets per-domain parameters.

`DomainUnit` wraps one shared conv (frozen) and the BN that follows it; `DomainHead` replaces the
classifier. Each keeps two forms of its domains:

- trainable modules, one per domain (`domains[name]`), used for training and as the reference;
- the adapter bank: eval-mode tensors stacked over slots, `[slots, C_out, C_in]` adapters and `[slots, C]`
  folded BN, gathered per row for a mixed batch (no Python loop per sample), plus merged weights
  (adapter folded into the 3x3 centre tap, BN into weight and bias) for single-domain batches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from residual_adapters.adapters import DomainUnitParams
from residual_adapters.config import pointwise_rank
from residual_adapters.context import ForwardContext

AdapterShape = tuple[str, int, int, int | None]
"""(mode "parallel"|"series", c_out, c_in, rank or None for a full matrix)."""

BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


def fold_bn(weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Eval-mode BN as y = x * scale + shift."""
    scale = (1 / torch.sqrt(var + eps)) * weight  # the order torch's own CPU batch_norm uses
    return scale, bias - mean * scale


def _wide(t: Tensor) -> Tensor:
    """Fold BN in at least fp32, whatever the artifact's or the bank's dtype."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _rows(t: Tensor) -> Tensor:
    return t[:, :, None, None]


def _as_nhwc(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last)


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

    bank_scale: Tensor
    bank_shift: Tensor

    def __init__(self, conv: nn.Conv2d | None, bn: nn.BatchNorm2d, ctx: ForwardContext) -> None:
        super().__init__()
        self.conv = conv
        self.base_bn = bn
        self.channels = bn.num_features
        self._ctx = [ctx]  # a list keeps it out of nn.Module's registries
        self.name = ""  # set by MultiDomainNet
        self.domains = nn.ModuleDict()
        self.bank_shapes: dict[str, AdapterShape] = {}
        self.merged: dict[int, tuple[Tensor, Tensor]] = {}
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
    def pointwise(self) -> bool:
        return self.conv is not None and tuple(self.conv.kernel_size) == (1, 1)

    @property
    def stride(self) -> int:
        return 1 if self.conv is None else int(self.conv.stride[0])

    def _centre(self, x: Tensor) -> Tensor:
        """The input pixels under the centre tap of each output position (what a strided 1x1 conv sees)."""
        s = self.stride
        return x if s == 1 else x[:, :, ::s, ::s]

    # -- trainable domains --------------------------------------------------------------------------
    def add_domain(self, name: str, *, domain_bn: bool, adapter: AdapterShape | None) -> None:
        self.domains[name] = DomainUnitParams(
            self.channels, self.base_bn, domain_bn=domain_bn, adapter=adapter
        )

    def _base_bn(self, y: Tensor) -> Tensor:
        b = self.base_bn  # always eval statistics: shared weights never change
        return F.batch_norm(y, b.running_mean, b.running_var, b.weight, b.bias, False, 0.0, b.eps)

    def _conv(self, x: Tensor) -> Tensor:
        return x if self.conv is None else self.conv(x)

    def forward(self, x: Tensor) -> Tensor:
        ctx = self._ctx[0]
        if ctx.mode == "merged":
            assert ctx.slot is not None
            w, b = self.merged[ctx.slot]
            if self.conv is None:
                return x * w[:, None, None] + b[:, None, None]
            c = self.conv
            return F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)
        if ctx.mode == "domain":
            return self._forward_domain(x, ctx)
        y = self._conv(x)
        if ctx.mode == "base":
            return self._base_bn(y)
        return self._forward_bank(x, y, ctx)

    def _forward_domain(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        p = self.domains[str(ctx.domain)]
        assert isinstance(p, DomainUnitParams)
        if p.adapter is None:
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
        self.bank_budget = pointwise_budget
        ref = self.base_bn.weight
        self.register_buffer("bank_scale", ref.new_ones(slots, self.channels), persistent=False)
        self.register_buffer("bank_shift", ref.new_zeros(slots, self.channels), persistent=False)
        self.bank_shapes = {}
        self.merged.clear()
        if parallel is not None:
            self._allocate_matrix("parallel", parallel, slots)

    def _allocate_matrix(self, mode: str, shape: AdapterShape, slots: int) -> None:
        _, c_out, c_in, rank = shape
        ref = self.bank_scale
        if rank is None:
            self.register_buffer(f"bank_{mode}_w", ref.new_zeros(slots, c_out, c_in), persistent=False)
        else:
            self.register_buffer(f"bank_{mode}_u", ref.new_zeros(slots, c_out, rank), persistent=False)
            self.register_buffer(f"bank_{mode}_v", ref.new_zeros(slots, rank, c_in), persistent=False)
        if mode == "series":
            self.register_buffer("bank_series_scale", ref.new_zeros(slots, c_out), persistent=False)
            self.register_buffer("bank_series_shift", ref.new_zeros(slots, c_out), persistent=False)
        self.bank_shapes[mode] = shape

    def _bank(self, name: str) -> Tensor:
        return self._buffers[name]  # type: ignore[return-value]

    @property
    def bank_slots(self) -> int:
        return int(self.bank_scale.shape[0])

    def bank_load(self, slot: int, tensors: dict[str, Tensor], adapter: AdapterShape | None) -> None:
        """Copy one domain's tensors (names relative to this unit) into `slot`, folding its BN."""
        if "bn.weight" in tensors:
            scale, shift = self._fold(tensors, "bn")
        else:  # head-only domains keep the backbone's own statistics
            b = self.base_bn
            scale, shift = fold_bn(b.weight, b.bias, b.running_mean, b.running_var, eps=b.eps)  # type: ignore[arg-type]
        self.bank_scale[slot].copy_(scale)
        self.bank_shift[slot].copy_(shift)
        self.merged.pop(slot, None)
        for mode in ("parallel", "series"):
            if mode in self.bank_shapes:
                self._matrix_store(mode, slot, None, 0)
        if adapter is None:
            return
        mode, c_out, _, rank = adapter
        if mode not in self.bank_shapes:
            if mode == "parallel":
                raise ValueError(f"unit {self.name} cannot take a parallel adapter in this bank")
            bank_rank = pointwise_rank(c_out, c_out, self.bank_budget) if self.pointwise else None
            self._allocate_matrix("series", (mode, c_out, c_out, bank_rank), self.bank_slots)
        if rank is None:
            self._matrix_store(mode, slot, tensors["adapter.weight"], None)
        else:
            self._matrix_store(mode, slot, (tensors["adapter.u"], tensors["adapter.v"]), rank)
        if mode == "series":
            s, t = self._fold(tensors, "series_bn")
            self._bank("bank_series_scale")[slot].copy_(s)
            self._bank("bank_series_shift")[slot].copy_(t)

    def _fold(self, tensors: dict[str, Tensor], prefix: str) -> tuple[Tensor, Tensor]:
        w, b, mean, var = (_wide(tensors[f"{prefix}.{k}"]) for k in BN_TENSORS)
        return fold_bn(w, b, mean, var, eps=self.base_bn.eps)

    def _matrix_store(
        self, mode: str, slot: int, value: Tensor | tuple[Tensor, Tensor] | None, rank: int | None
    ) -> None:
        bank_rank = self.bank_shapes[mode][3]
        if bank_rank is None:  # full storage: materialise low-rank factors
            w = self._bank(f"bank_{mode}_w")[slot]
            if value is None:
                w.zero_()
            else:
                w.copy_(value[0] @ value[1] if isinstance(value, tuple) else value)
            return
        u, v = self._bank(f"bank_{mode}_u")[slot], self._bank(f"bank_{mode}_v")[slot]
        u.zero_()
        v.zero_()
        if value is None:
            return
        if not isinstance(value, tuple) or rank is None or rank > bank_rank:
            raise ValueError(
                f"unit {self.name}: the bank stores this 1x1 adapter at rank {bank_rank}; "
                f"got {'a full matrix' if rank is None else f'rank {rank}'}"
            )
        u[:, :rank].copy_(value[0])
        v[:rank].copy_(value[1])

    def bank_matrix(self, mode: str, slot: int) -> Tensor:
        """One slot's adapter as a full [c_out, c_in] matrix."""
        if self.bank_shapes[mode][3] is None:
            return self._bank(f"bank_{mode}_w")[slot]
        return self._bank(f"bank_{mode}_u")[slot] @ self._bank(f"bank_{mode}_v")[slot]

    def _add_adapter(self, mode: str, y: Tensor, x: Tensor, ctx: ForwardContext) -> None:
        """y += A_slot(row) x, in place, for channels-last y and any-layout x.

        segments (CPU): rows are sorted by slot and each run of rows is one [rows*H*W, C] matrix, so a domain
        costs a single well-shaped GEMM (as Punica's SGMV does), no per-row gather.
        gather (GPU): each row's matrix gathered and one batched GEMM for the whole batch: one kernel per
        layer, where per-domain launches would dominate at these sizes.
        """
        b, c_in, h, w = x.shape
        x_rows = _as_nhwc(x).permute(0, 2, 3, 1).reshape(b, h * w, c_in)
        y_rows = y.permute(0, 2, 3, 1).view(b, h * w, y.shape[1])
        full = self.bank_shapes[mode][3] is None
        if ctx.gather:
            index = ctx.slot_index if ctx.slot is None else torch.full((b,), ctx.slot, device=x.device)
            if full:
                y_rows.baddbmm_(x_rows, self._bank(f"bank_{mode}_w")[index].transpose(1, 2))
            else:
                inner = torch.bmm(x_rows, self._bank(f"bank_{mode}_v")[index].transpose(1, 2))
                y_rows.baddbmm_(inner, self._bank(f"bank_{mode}_u")[index].transpose(1, 2))
            return
        x_flat, y_flat = x_rows.view(b * h * w, c_in), y_rows.view(b * h * w, y.shape[1])
        rows = h * w
        for slot, start, end in ctx.segments:
            seg_x, seg_y = x_flat[start * rows : end * rows], y_flat[start * rows : end * rows]
            if full:
                seg_y.addmm_(seg_x, self._bank(f"bank_{mode}_w")[slot].t())
            else:
                inner = seg_x @ self._bank(f"bank_{mode}_v")[slot].t()
                seg_y.addmm_(inner, self._bank(f"bank_{mode}_u")[slot].t())

    def _rows_of(self, name: str, ctx: ForwardContext) -> Tensor:
        """A per-slot [slots, C] bank tensor as per-row [B or 1, C, 1, 1] factors."""
        t = self._bank(name)
        return _rows(t[ctx.slot][None] if ctx.slot is not None else t[ctx.slot_index])

    def _forward_bank(self, x: Tensor, y: Tensor, ctx: ForwardContext) -> Tensor:
        y = _as_nhwc(y)  # a fresh conv output: safe to update in place (the bank path is inference-only)
        if "parallel" in self.bank_shapes:
            self._add_adapter("parallel", y, self._centre(x), ctx)
        if ctx.series and "series" in self.bank_shapes:
            t = torch.addcmul(
                self._rows_of("bank_series_shift", ctx), y, self._rows_of("bank_series_scale", ctx)
            )
            self._add_adapter("series", y, t, ctx)
        return torch.addcmul(self._rows_of("bank_shift", ctx), y, self._rows_of("bank_scale", ctx))

    def merge(self, slot: int) -> None:
        """Fold slot's adapters into the conv's centre tap and its BN into weight and bias."""
        scale, shift = self.bank_scale[slot], self.bank_shift[slot]
        if self.conv is None:
            self.merged[slot] = (scale.clone(), shift.clone())
            return
        w = self.conv.weight.detach().clone()
        bias = self.conv.bias.detach().clone() if self.conv.bias is not None else torch.zeros_like(scale)
        kh, kw = w.shape[2] // 2, w.shape[3] // 2
        if "parallel" in self.bank_shapes:
            w[:, :, kh, kw] += self.bank_matrix("parallel", slot)
        if "series" in self.bank_shapes:
            # y = z + A (s' z + t')  =  (I + A diag(s')) z + A t'
            a = self.bank_matrix("series", slot)
            m = (
                torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
                + a * self._bank("bank_series_scale")[slot][None, :]
            )
            w = (m @ w.flatten(1)).view_as(w)
            bias = m @ bias + a @ self._bank("bank_series_shift")[slot]
        self.merged[slot] = ((w * scale.view(-1, 1, 1, 1)).contiguous(), bias * scale + shift)


class DomainHead(nn.Module):
    """Per-domain linear classifier; any number of classes per domain."""

    bank_weight: Tensor
    bank_bias: Tensor

    def __init__(self, in_features: int, ctx: ForwardContext, base: nn.Linear | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self._ctx = [ctx]
        self.domains = nn.ModuleDict()
        self.base = base  # the imported network's own classifier, used by the plain-backbone path
        if base is not None:
            base.requires_grad_(False)
        self.classes: list[int] = []

    def add_domain(self, name: str, num_classes: int) -> None:
        head = nn.Linear(self.in_features, num_classes)
        nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)
        self.domains[name] = head

    def enable_bank(self, slots: int, like: Tensor) -> None:
        """Allocate `slots` empty heads on `like`'s device and dtype; they grow to the largest class count."""
        self.register_buffer("bank_weight", like.new_zeros(slots, 1, self.in_features), persistent=False)
        self.register_buffer("bank_bias", like.new_zeros(slots, 1), persistent=False)
        self.classes = [0] * slots

    def bank_load(self, slot: int, weight: Tensor, bias: Tensor) -> None:
        k = weight.shape[0]
        if k > self.bank_weight.shape[1]:  # grow to the largest class count; padding stays masked
            slots = self.bank_weight.shape[0]
            grown_w = self.bank_weight.new_zeros(slots, k, self.in_features)
            grown_b = self.bank_bias.new_zeros(slots, k)
            grown_w[:, : self.bank_weight.shape[1]] = self.bank_weight
            grown_b[:, : self.bank_bias.shape[1]] = self.bank_bias
            self.bank_weight, self.bank_bias = grown_w, grown_b
        self.bank_weight[slot].zero_()
        self.bank_bias[slot].zero_()
        self.bank_weight[slot, :k].copy_(weight)
        self.bank_bias[slot, :k].copy_(bias)
        self.classes[slot] = k

    def forward(self, x: Tensor) -> Tensor:
        ctx = self._ctx[0]
        if ctx.mode == "base":
            return x if self.base is None else self.base(x)
        if ctx.mode == "domain":
            return self.domains[str(ctx.domain)](x)  # type: ignore[no-any-return]
        if ctx.slot is not None:  # one slot: exactly its classes
            k = self.classes[ctx.slot]
            return F.linear(x, self.bank_weight[ctx.slot, :k], self.bank_bias[ctx.slot, :k])
        assert ctx.slot_index is not None
        idx = ctx.slot_index
        logits = torch.bmm(self.bank_weight[idx], x[:, :, None])[:, :, 0] + self.bank_bias[idx]
        classes = torch.tensor(self.classes, device=x.device)[idx]
        pad = torch.arange(logits.shape[1], device=x.device)[None, :] >= classes[:, None]
        return logits.masked_fill(pad, float("-inf"))
