"""A format-1 domain artifact committed as written by the code before format 2 existed (commit add92a1 of
``main``, ``python -m tests.model_artifacts.format_v1``), and the backbone it belongs to.

The backbone's shared weights are exact binary fractions set from their index, so its fingerprint is the
same on every machine and kernel set (random initialisation is not: vectorised RNG paths differ by CPU),
and the fixture needs no committed backbone.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import torch

from adapters_store.manifest import Preprocessing, Provenance
from residual_adapters import AdapterConfig, MultiDomainNet, create_backbone

FIXTURE = Path(__file__).parent / "fixtures" / "format1_parallel"
"""manifest.json + adapter.safetensors of domain ``shapes`` (kind parallel, shallow allocation, 4 classes)."""


@torch.no_grad()
def fixture_backbone() -> MultiDomainNet:
    """ResNet-26 at width 1/4 with index-derived shared weights (exactly representable values)."""
    net = create_backbone("resnet26", width=0.25).eval()
    for key, t in net.shared_state_dict().items():
        i = torch.arange(t.numel(), dtype=torch.float64).view(t.shape)
        wave = (i * 37 % 23 - 11) / 256  # in [-11/256, 11/256]: keeps activations tame through 26 layers
        if key.endswith("running_var"):
            t.copy_(1 + (i % 5) / 8)
        elif key.endswith("bn.weight"):
            t.copy_(1 + wave)
        else:
            t.copy_(wave)
    return net


@torch.no_grad()
def write_fixture() -> None:
    from model_artifacts import domain_artifact
    from training.export import write_domain_dir

    net = fixture_backbone()
    net.add_domain("shapes", AdapterConfig(kind="parallel", allocation="shallow"), num_classes=4)
    for j, (key, t) in enumerate(sorted(net.domain_state("shapes").items())):
        i = torch.arange(t.numel(), dtype=torch.float64).view(t.shape)
        if key.endswith("running_var"):
            t.copy_(1 + ((i + j) % 3) / 4)
        elif key.endswith("bn.weight"):
            t.copy_(1 + ((i + j) % 7 - 3) / 64)
        else:
            t.copy_(((i * 13 + j) % 17 - 8) / 512)
    artifact = domain_artifact(
        net,
        "shapes",
        labels=["circle", "square", "triangle", "star"],
        preprocessing=Preprocessing(
            input_size=32, resize=36, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], channels="rgb"
        ),
        provenance=Provenance(dataset="fixture", epochs=0, created_at=datetime(2026, 12, 1, tzinfo=UTC)),
    )
    write_domain_dir(artifact, FIXTURE)


if __name__ == "__main__":
    write_fixture()
