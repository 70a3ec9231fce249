"""torchvision ResNet-18/34/50 and MobileNetV2 with domain slots.

We keep torchvision's own module classes (and so their forward code) and replace, in place, every conv
followed by its BN with a `DomainUnit` and the classifier with a `DomainHead`. With the imported classifier
as a head-only domain the network therefore computes exactly what torchvision computes.

Adapter placement (what `AdapterConfig` sees as adaptable units):
- every dense conv with 'same' padding: the 3x3 convs, the 7x7 ResNet stem, and the 1x1 convs
  (bottleneck reduce/expand, downsample projections, MobileNetV2 expand/project);
- 1x1 convs get low-rank adapters (rank from `pointwise_budget`, 10% of that conv by default): a full 1x1
  adapter on a 1x1 conv would be as large as the conv itself, and MobileNetV2 is almost all 1x1 convs;
- depthwise convs (groups > 1) get domain BN only: a 1x1 dense adapter does not fold into them; kind
  `depthwise` adds a per-domain delta of their own kernel there instead (`MultiDomainNet.depthwise_units`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from residual_adapters.backbones import register_backbone
from residual_adapters.config import AdapterConfig
from residual_adapters.network import MultiDomainNet
from residual_adapters.units import DomainHead, DomainUnit

Weights = str | Path | Mapping[str, Tensor] | None


def _load_state_dict(weights: Weights) -> Mapping[str, Tensor] | None:
    if weights is None or isinstance(weights, Mapping):
        return weights
    # Only for a file the operator names; weights_only refuses anything but tensors.
    return torch.load(weights, map_location="cpu", weights_only=True)  # type: ignore[no-any-return]


def wrap_conv_bn_pairs(model: nn.Module) -> None:
    """Replace each conv and the BN that directly follows it by one DomainUnit (+ an Identity)."""
    for _, parent in list(model.named_modules()):
        children = dict(parent.named_children())
        if isinstance(parent, nn.Sequential):
            names = list(children)
            pairs = list(itertools.pairwise(names))
        else:  # torchvision blocks name their pairs conv1/bn1, conv2/bn2, ...
            pairs = [(n, "bn" + n[4:]) for n in children if n.startswith("conv")]
        for conv_name, bn_name in pairs:
            conv, bn = children.get(conv_name), children.get(bn_name)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(parent, conv_name, DomainUnit(conv, bn))
                setattr(parent, bn_name, nn.Identity())


def _import(
    name: str,
    build: Callable[[], nn.Module],
    classifier_path: tuple[str, ...],
    weights: Weights,
    classifier_domain: str | None,
) -> MultiDomainNet:
    model = build()
    state = _load_state_dict(weights)
    if state is not None:
        model.load_state_dict(state)
    wrap_conv_bn_pairs(model)
    parent = model
    for part in classifier_path[:-1]:
        parent = getattr(parent, part)
    classifier: nn.Linear = getattr(parent, classifier_path[-1])
    setattr(parent, classifier_path[-1], DomainHead(classifier.in_features, base=classifier))
    net = MultiDomainNet(model, {"name": name, "kwargs": {}})
    if state is not None and classifier_domain is not None:
        net.load_domain(
            classifier_domain,
            AdapterConfig(kind="head"),
            {"head.weight": classifier.weight.detach(), "head.bias": classifier.bias.detach()},
        )
    return net


def _register(name: str, build: Callable[[], nn.Module], classifier_path: tuple[str, ...]) -> None:
    def builder(*, weights: Weights = None, classifier_domain: str | None = "imagenet") -> MultiDomainNet:
        return _import(name, build, classifier_path, weights, classifier_domain)

    builder.__doc__ = (
        f"torchvision {name} with domain slots; `weights`: a torchvision state_dict (path or mapping)."
    )
    register_backbone(name)(builder)


_register("resnet18", torchvision.models.resnet18, ("fc",))
_register("resnet34", torchvision.models.resnet34, ("fc",))
_register("resnet50", torchvision.models.resnet50, ("fc",))
_register("mobilenet_v2", torchvision.models.mobilenet_v2, ("classifier", "1"))
