"""Bank kernels: adapters, BN and heads applied from the adapter bank to a batch whose rows may differ in slot.

Two ways to apply a slot's adapter to its rows, chosen per call (`SlotPlan.strategy`, `MixedPlan.strategy`):

    segments (CPU)  rows sorted by slot; each run of rows is one [rows*H*W, C] matrix, so a domain costs a
                    single well-shaped GEMM per layer (as Punica's SGMV does), no per-row gather;
    gather (GPU)    each row's matrix gathered, one batched GEMM for the whole batch: one kernel per layer,
                    where per-domain launches would dominate at these sizes.

Activations are channels-last so a [B, C, H, W] tensor is a [B*H*W, C] matrix without a copy.
"""

from __future__ import annotations

import torch
from torch import Tensor

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


def slot_logits(head: HeadBank, x: Tensor, slot: int) -> Tensor:
    """Every row through one slot's head: exactly its classes, [B, K_slot]."""
    k = head.classes[slot]
    return torch.nn.functional.linear(x, head.weight[slot, :k], head.bias[slot, :k])


def mixed_logits(head: HeadBank, x: Tensor, slot_index: Tensor) -> Tensor:
    """Each row through its own slot's head, [B, K_max]; classes beyond a row's own count are -inf."""
    logits = torch.bmm(head.weight[slot_index], x[:, :, None])[:, :, 0] + head.bias[slot_index]
    classes = torch.tensor(head.classes, device=x.device)[slot_index]
    pad = torch.arange(logits.shape[1], device=x.device)[None, :] >= classes[:, None]
    return logits.masked_fill(pad, float("-inf"))
