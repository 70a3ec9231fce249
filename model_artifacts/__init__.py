"""The glue between artifacts and models: the one place that converts between what ``adapters_store``
holds (manifests, safetensors) and what ``residual_adapters`` builds (networks, ``AdapterConfig``).

It sits between the lower layers (``domain_format`` < ``residual_adapters``, ``adapters_store``) and the
upper ones (``server``, ``training`` < ``multidomain``): the store knows a domain spec only as data, the
model family knows no files, and every conversion between the two lives here once.

- ``model_artifacts.convert``: manifest -> ``AdapterConfig`` (``adapter_config``), backbone artifact ->
  checked network (``backbone_network``), ``spec_for(net)``, network -> artifacts (``backbone_artifact``,
  ``domain_artifact``), validation against a network (``validate_domain``).
- ``model_artifacts.torchvision_import``: torchvision weights as a backbone artifact + its classifier as a
  domain (``import_torchvision``), the offline MobileNetV2 weights (``mobilenet_weights_path``).
"""

from model_artifacts.convert import (
    BackboneArtifact,
    BackboneRefused,
    DomainArtifact,
    adapter_config,
    adapter_settings,
    backbone_artifact,
    backbone_network,
    domain_artifact,
    load_validated_domain,
    spec_for,
    tensors_to_bytes,
    validate_domain,
)
from model_artifacts.torchvision_import import (
    WeightsNotInstalled,
    import_torchvision,
    mobilenet_weights_installed,
    mobilenet_weights_path,
)

__all__ = [
    "BackboneArtifact",
    "BackboneRefused",
    "DomainArtifact",
    "WeightsNotInstalled",
    "adapter_config",
    "adapter_settings",
    "backbone_artifact",
    "backbone_network",
    "domain_artifact",
    "import_torchvision",
    "load_validated_domain",
    "mobilenet_weights_installed",
    "mobilenet_weights_path",
    "spec_for",
    "tensors_to_bytes",
    "validate_domain",
]
