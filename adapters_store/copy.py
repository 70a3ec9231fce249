"""``copy_store``: copy one store into another, across backends (a directory to S3 and back).

Copies the backbone and, per domain, every stored version with its number, the active version and
the rollback history, so clients see the same versions and a rollback goes where it went before.
Every object is checked against its manifest's sha256 on the way. Domains already present (or once
present) in the destination are refused (``StoreConflict``) before anything of theirs is written:
their numbers are taken there. Holds one version in memory at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapters_store.errors import BackboneNotFound
from adapters_store.manifest import DomainManifest, manifest_to_json
from adapters_store.store import AdapterStore
from adapters_store.validation import validate_backbone_artifact


@dataclass(frozen=True)
class CopyReport:
    domains: int
    versions: int
    bytes: int
    """Tensor bytes copied (backbone included)."""


def copy_store(source: AdapterStore, destination: AdapterStore) -> CopyReport:
    copied_bytes = 0
    try:
        backbone = source.get_backbone()
    except BackboneNotFound:
        backbone = None
    if backbone is not None:
        tensors = backbone.read_tensor_bytes(verify=True)
        destination.put_backbone(validate_backbone_artifact(manifest_to_json(backbone.manifest), tensors))
        copied_bytes += len(tensors)
    infos = source.describe_all()
    versions = 0
    for info in infos:

        def read(version: int, domain: str = info.domain) -> tuple[DomainManifest, bytes]:
            nonlocal copied_bytes
            stored = source.get(domain, version)
            data = stored.read_tensor_bytes(verify=True)
            copied_bytes += len(data)
            return stored.manifest, data

        destination.restore_domain(info, read)
        versions += len(info.versions)
    return CopyReport(len(infos), versions, copied_bytes)
