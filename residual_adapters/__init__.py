"""The residual-adapter model family: one frozen backbone, many small domains (Rebuffi et al., CVPR 2018)."""

from residual_adapters.adapters import is_adapter_tensor
from residual_adapters.backbones import create_backbone, list_backbones, register_backbone
from residual_adapters.config import ADAPTER_KINDS, AdapterConfig
from residual_adapters.network import DomainInfo, DomainMismatch, MultiDomainNet, TensorSpec, check_tensors

__all__ = [
    "ADAPTER_KINDS",
    "AdapterConfig",
    "DomainInfo",
    "DomainMismatch",
    "MultiDomainNet",
    "TensorSpec",
    "check_tensors",
    "create_backbone",
    "is_adapter_tensor",
    "list_backbones",
    "register_backbone",
]
