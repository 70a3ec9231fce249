"""The adapter kinds and the defaults of a domain's adapter layout: declared once, torch-free.

Both the model family's ``AdapterConfig`` (``residual_adapters/config.py``, a dataclass) and the
manifest's ``AdapterSettings`` (``adapters_store/manifest.py``, a strict pydantic model) are built from
these names, so an artifact and the network it is loaded into can never disagree on what a kind is
called or what an omitted field means.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

AdapterKind = Literal["parallel", "series", "lowrank", "bn", "head", "depthwise"]
"""parallel: y = BN_d(W*x + A_d*x); series: y = BN_d(z + A_d*BN'_d(z)), z = W*x; lowrank: parallel with
A_d = U_d V_d; bn: domain BN + head only ("BN adapt"); head: head only (the frozen backbone as a feature
extractor, base BN statistics); depthwise: parallel, and every depthwise conv (groups = C_in, e.g.
MobileNetV2's 3x3) gets a per-domain delta of its own kernel's shape, y = BN_d((W + D_d)*x): 9 C weights
a layer (beyond the paper, which adapts dense convs only; on a network without depthwise convs it is
parallel)."""

ADAPTER_KINDS: Final[tuple[AdapterKind, ...]] = get_args(AdapterKind)
KINDS_WITH_ADAPTERS: Final[frozenset[AdapterKind]] = frozenset({"parallel", "series", "lowrank", "depthwise"})
"""Kinds that add 1x1 adapters to the convolutions (the others adapt BN and/or the head only)."""
KINDS_WITH_DEPTHWISE: Final[frozenset[AdapterKind]] = frozenset({"depthwise"})
"""Kinds that add a per-domain delta to every depthwise conv's kernel (artifacts of format 2)."""
KINDS_WITH_DOMAIN_BN: Final[frozenset[AdapterKind]] = frozenset(set(ADAPTER_KINDS) - {"head"})
"""Kinds whose domains carry their own batch norm (``head`` keeps the backbone's)."""

DEFAULT_KIND: Final[AdapterKind] = "parallel"
DEFAULT_RANK: Final[None] = None
"""``lowrank`` requires a rank; the other kinds ignore it."""
DEFAULT_ALLOCATION: Final[str] = "all"
"""Every adaptable unit gets an adapter."""
DEFAULT_POINTWISE_BUDGET: Final[float] = 0.1
"""1x1 convolutions get low-rank adapters of about this fraction of that conv's weights."""

ADAPTER_FIELDS: Final[tuple[str, ...]] = ("kind", "rank", "allocation", "pointwise_budget", "unit_ranks")
"""The field names both the dataclass and the manifest model have (their JSON interface)."""
