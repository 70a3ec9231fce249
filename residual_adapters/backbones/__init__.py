"""Backbone registry: `create_backbone(name, ...)` builds a `MultiDomainNet` for any registered architecture."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from residual_adapters.network import MultiDomainNet

BackboneBuilder = Callable[..., MultiDomainNet]
_REGISTRY: dict[str, BackboneBuilder] = {}


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    def deco(fn: BackboneBuilder) -> BackboneBuilder:
        _REGISTRY[name] = fn
        return fn

    return deco


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def create_backbone(
    name: str, *, weights: str | Path | None = None, classifier_domain: str | None = "imagenet", **kwargs: Any
) -> MultiDomainNet:
    """Build a backbone with domain slots.

    weights: a local torchvision state_dict file (torchvision architectures only); its classifier becomes a
    head-only domain named `classifier_domain` (None drops it), so the imported network with that domain
    reproduces torchvision's outputs. kwargs are structural (e.g. resnet26's `width`) and are recorded in
    `net.architecture` so the same call can rebuild the body from a backbone artifact.
    """
    if name not in _REGISTRY:
        raise KeyError(f"unknown backbone {name!r}; registered: {list_backbones()}")
    return _REGISTRY[name](weights=weights, classifier_domain=classifier_domain, **kwargs)


from residual_adapters.backbones import resnet26, torchvision_nets  # noqa: E402,F401  (registration)
