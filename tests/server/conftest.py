"""Fixtures: a tiny resnet26 (width 0.125, 24 px inputs) in a temp store with three domains, and apps on it.

The network object is kept so tests can compare the server's answers with the model library's own
reference forward (`forward_domain`) on the same preprocessed pixels.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the server does (only effective before torch loads)

import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from adapters_store import LocalStore, Preprocessing, Provenance, manifest_to_json, validate_backbone_artifact
from model_artifacts import backbone_artifact, domain_artifact, validate_domain
from residual_adapters import AdapterConfig, MultiDomainNet, create_backbone
from server.app import create_app
from server.settings import Settings
from tests.numerics import probability_bound

ADMIN = "admin-secret"
LOGIT_SCALE = 32.0
"""A bound on the world's logits for the tests' images (the largest is about 13; checked by
`tests/server/test_tolerance.py`): the scale the probability tolerance is derived from."""
MAX_CLASSES = 5


def _one_domain_path() -> MultiDomainNet:
    """What one request runs through: the world's backbone with one domain of the deepest kind."""
    net = create_backbone("resnet26", width=0.125)
    net.add_domain("path", AdapterConfig(kind="series"), MAX_CLASSES)
    return net


TOL = 2e-3 if torch.cuda.is_available() else probability_bound(_one_domain_path(), LOGIT_SCALE, MAX_CLASSES)
"""Probability tolerance of a server answer against the library's reference forward: two float32 paths
through the world's network (tests/numerics.py). CUDA convolutions may use TF32."""
PRE = Preprocessing(input_size=24, resize=28, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], channels="rgb")
GRAY = PRE.model_copy(update={"channels": "grayscale", "mean": [0.4, 0.4, 0.4]})
PROVENANCE = Provenance(
    dataset="synthetic", epochs=1, val_accuracy=0.5, created_at=datetime(2024, 1, 1, tzinfo=UTC)
)

# name -> (adapter config, number of classes, preprocessing)
DOMAINS = {
    "birds": (AdapterConfig(kind="parallel"), 3, PRE),
    "digits": (AdapterConfig(kind="bn"), 4, PRE),
    "textures": (AdapterConfig(kind="series"), 5, GRAY),
}


def randomise(net: MultiDomainNet, name: str, seed: int) -> None:
    """Non-trivial domain tensors (a fresh domain equals the base network)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in net.domain_state(name).items():
            if key.endswith(("running_var", "bn.weight")):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)


@dataclass
class Artifact:
    manifest: bytes
    tensors: bytes


@dataclass
class TinyWorld:
    net: MultiDomainNet
    artifacts: dict[str, Artifact]
    """Domain name -> artifact (also "birds_v2": another version of birds)."""

    def reference(self, name: str, image: Image.Image) -> torch.Tensor:
        """Class probabilities from the model library's trainable forward, same preprocessing (from the
        decoded image on: the shared pixels and normalisation)."""
        from domain_format.preprocess import centre_crop, fit
        from server.preprocess import network_input

        pre = DOMAINS[name.split("_")[0]][2]
        spec = pre.image_spec()
        x = network_input(centre_crop(fit(image, spec), spec.input_size), pre)[None]
        with torch.no_grad():
            return torch.softmax(self.net.forward_domain(x, name), dim=1)[0]


@pytest.fixture(scope="session")
def world() -> TinyWorld:
    torch.manual_seed(0)
    net = create_backbone("resnet26", width=0.125).eval()
    artifacts = {}
    for seed, (name, (cfg, k, pre)) in enumerate([*DOMAINS.items(), ("birds_v2", DOMAINS["birds"])]):
        net.add_domain(name, cfg, k)
        randomise(net, name, seed)
        manifest, tensors = domain_artifact(
            net,
            name,
            labels=[f"{name.split('_')[0]}_{i}" for i in range(k)],
            preprocessing=pre,
            provenance=PROVENANCE,
            domain=name.split("_")[0],
        )
        artifacts[name] = Artifact(manifest_to_json(manifest), tensors)
    net.eval()
    return TinyWorld(net, artifacts)


def make_store(world: TinyWorld, root: Path, domains: tuple[str, ...] = tuple(DOMAINS)) -> LocalStore:
    store = LocalStore(root)
    manifest, tensors = backbone_artifact(world.net)
    store.put_backbone(validate_backbone_artifact(manifest_to_json(manifest), tensors))
    for name in domains:
        art = world.artifacts[name]
        store.put(validate_domain(art.manifest, art.tensors, world.net), activate=True)
    return store


@pytest.fixture
def store(world: TinyWorld, tmp_path: Path) -> LocalStore:
    return make_store(world, tmp_path / "store")


def settings_for(store: LocalStore, **overrides: object) -> Settings:
    base: dict[str, object] = {
        "store_dir": store.root,
        "admin_token": ADMIN,
        "bank_slots": 4,
        "max_wait_ms": 2.0,
        "revision_poll_s": 0.0,
        "decode_threads": 2,
    }
    return Settings(**{**base, **overrides})  # type: ignore[arg-type]


@pytest.fixture
def client(store: LocalStore) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(store))) as c:
        yield c


def image(seed: int = 0, size: tuple[int, int] = (40, 32), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def auth(token: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
