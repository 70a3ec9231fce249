"""Bank kernels: adapters, BN and heads applied from the adapter bank to a batch whose rows may differ in slot.

Two ways to apply a slot's adapter to its rows, chosen per call (`SlotPlan.strategy`, `MixedPlan.strategy`):

    segments (CPU)  rows sorted by slot; each run of rows is one [rows*H*W, C] matrix, so a domain costs a
                    single well-shaped GEMM per layer (as Punica's SGMV does), no per-row gather;
    gather (GPU)    each row's matrix gathered, one batched GEMM for the whole batch: one kernel per layer,
                    where per-domain launches would dominate at these sizes.

Activations are channels-last so a [B, C, H, W] tensor is a [B*H*W, C] matrix without a copy.

A depthwise conv with per-domain kernel deltas runs each row through its own kernel W + D_slot instead of
the shared conv (a depthwise conv's cost does not depend on whose kernel it is): one conv per run of rows
(segments), or all rows at once as the groups of one grouped conv (gather).

Heads: each run of rows through its own slot's head, the logits assembled into [B, K] (K the widest
resident head's class count), columns beyond a row's own classes -inf: padding only in the output.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from residual_adapters.bank import HeadBank, SlotMatrices
from residual_adapters.plan import MixedPlan, Segment, SlotPlan

BankPlan = SlotPlan | MixedPlan


def as_nhwc(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def per_row(t: Tensor, plan: BankPlan) -> Tensor:
    """A per-slot [slots, C] bank tensor as per-row [B or 1, C, 1, 1] factors."""
    rows = t[plan.slot][None] if isinstance(plan, SlotPlan) else t[plan.slot_index]
    return rows[:, :, None, None]


def add_adapter(y: Tensor, x: Tensor, matrices: SlotMatrices, plan: BankPlan) -> None:
    """y += A_slot(row) x, in place, for channels-last y and any-layout x."""
    b, c_in, h, w = x.shape
    x_rows = as_nhwc(x).permute(0, 2, 3, 1).reshape(b, h * w, c_in)
    y_rows = y.permute(0, 2, 3, 1).view(b, h * w, y.shape[1])
    if plan.strategy == "gather":
        if isinstance(plan, SlotPlan):
            index = torch.full((b,), plan.slot, device=x.device)
        else:
            index = plan.slot_index
        _add_gathered(x_rows, y_rows, matrices, index)
        return
    segments = (Segment(plan.slot, 0, b),) if isinstance(plan, SlotPlan) else plan.segments
    x_flat, y_flat = x_rows.view(b * h * w, c_in), y_rows.view(b * h * w, y.shape[1])
    _add_segments(x_flat, y_flat, matrices, segments, h * w)


def _add_gathered(x_rows: Tensor, y_rows: Tensor, matrices: SlotMatrices, index: Tensor) -> None:
    if matrices.rank is None:
        y_rows.baddbmm_(x_rows, matrices.buffer("weight")[index].transpose(1, 2))
    else:
        inner = torch.bmm(x_rows, matrices.buffer("v")[index].transpose(1, 2))
        y_rows.baddbmm_(inner, matrices.buffer("u")[index].transpose(1, 2))


def _add_segments(
    x_flat: Tensor, y_flat: Tensor, matrices: SlotMatrices, segments: tuple[Segment, ...], rows: int
) -> None:
    for slot, start, end in segments:
        seg_x, seg_y = x_flat[start * rows : end * rows], y_flat[start * rows : end * rows]
        if matrices.rank is None:
            seg_y.addmm_(seg_x, matrices.buffer("weight")[slot].t())
        else:
            inner = seg_x @ matrices.buffer("v")[slot].t()
            seg_y.addmm_(inner, matrices.buffer("u")[slot].t())


def depthwise_conv(x: Tensor, conv: nn.Conv2d, deltas: Tensor, plan: BankPlan) -> Tensor:
    """The depthwise `conv` with each row's kernel W + deltas[slot(row)] ([slots, C, 1, kh, kw]; zero for
    slots without a delta), channels-last."""
    weight = conv.weight.detach()

    def conv_with(kernel: Tensor, rows: Tensor, groups: int, bias: Tensor | None) -> Tensor:
        return torch.nn.functional.conv2d(
            rows, kernel, bias, conv.stride, conv.padding, conv.dilation, groups
        )

    if isinstance(plan, SlotPlan):
        return as_nhwc(conv_with(weight + deltas[plan.slot], x, conv.groups, conv.bias))
    if plan.strategy == "gather":  # the batch's rows as the groups of one conv: one kernel launch
        b, c, h, w = x.shape
        kernels = (weight[None] + deltas[plan.slot_index]).reshape(-1, *weight.shape[1:])
        bias = None if conv.bias is None else conv.bias.repeat(b)
        y = conv_with(kernels, x.contiguous().view(1, b * c, h, w), b * conv.groups, bias)
        return as_nhwc(y.view(b, -1, *y.shape[2:]))
    parts = [
        conv_with(weight + deltas[slot], x[start:end], conv.groups, conv.bias)
        for slot, start, end in plan.segments
    ]
    return as_nhwc(torch.cat(parts))


def slot_logits(head: HeadBank, x: Tensor, slot: int) -> Tensor:
    """Every row through one slot's head: exactly its classes, [B, K_slot]."""
    return torch.nn.functional.linear(x, head.weight(slot), head.bias(slot))


def mixed_logits(head: HeadBank, x: Tensor, segments: tuple[Segment, ...]) -> Tensor:
    """Each run of rows through its own slot's head, [B, K_max] (K_max: the widest resident head); classes
    beyond a row's own count are -inf. Only the output is padded: no slot's head is ever widened."""
    logits = x.new_full((x.shape[0], head.max_classes), float("-inf"))
    for slot, start, end in segments:
        k = head.classes(slot)
        logits[start:end, :k] = torch.nn.functional.linear(x[start:end], head.weight(slot), head.bias(slot))
    return logits


def class_padding_mask(classes: Tensor, width: int) -> Tensor:
    """[B, width] bool: True in the columns beyond each row's own class count (`classes`, [B])."""
    return torch.arange(width, device=classes.device)[None, :] >= classes[:, None]
