"""The forward context: how every unit of one network runs the current forward pass.

`MultiDomainNet` sets it around each call; the units (deep inside torchvision's own module code, whose
forward signatures we keep) read it. One network instance runs one forward at a time: the server has
one inference worker per device.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

Mode = Literal["base", "domain", "mixed", "merged"]


@dataclass
class ForwardContext:
    mode: Mode = "base"
    """base: the plain backbone (base BN); domain: one domain's trainable modules; mixed: the adapter bank,
    one slot per row; merged: one slot's folded weights."""
    domain: str | None = None
    slot_index: Tensor | None = None
    """mixed: the bank slot of every row, shape [B], rows sorted by slot."""
    segments: tuple[tuple[int, int, int], ...] = ()
    """mixed: (slot, first row, end row) of each run of rows that share a slot."""
    slot: int | None = None
    """mixed with every row in one slot, or merged: that slot (lets units skip the per-row gather)."""
    gather: bool = False
    """mixed: apply adapters by per-row gather + batched GEMM instead of per-segment GEMMs."""
    series: bool = False
    """mixed: whether any row's domain has series adapters (else that path is skipped)."""

    @contextmanager
    def use(self, **fields: object) -> Iterator[None]:
        saved = dict(self.__dict__)
        self.__dict__.update(fields)
        try:
            yield
        finally:
            self.__dict__.update(saved)
