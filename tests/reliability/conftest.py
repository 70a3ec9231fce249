"""Fixtures: the server tests' tiny resnet26 world (width 0.125, 24 px), the multi-process server on a
temp store (one per test module), and the hostile corpus generated into a temp directory."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import safetensors.numpy
import torch
from PIL import Image

from adapters_store import LocalStore
from tests.reliability.hostile_corpus import ImageCase, UploadCase, ValidArtifact, load_corpus, write_corpus
from tests.server.conftest import TOL, TinyWorld, encode, image, make_store, start_processes, world

__all__ = ["world"]  # re-exported fixture: pytest finds it through this module

MAX_PIXELS = 1_000_000


def store_snapshot(store: LocalStore) -> tuple[int, dict[str, str]]:
    """The store's revision and the sha256 of every file under its root (the lock file aside)."""
    files = {
        str(p.relative_to(store.root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(store.root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }
    return store.revision(), files


@dataclass
class Served:
    client: httpx.Client
    """Over loopback HTTP to the multi-process server (supervisor, two front ends, an engine)."""
    store: LocalStore
    world: TinyWorld
    probe: bytes
    """A known-good PNG; `expected` is its reference answer in domain birds (v1)."""
    expected: torch.Tensor

    def still_correct(self) -> str | None:
        """None when the known-good request gets its reference answer from v1, else what went wrong."""
        r = self.client.post(
            "/v1/domains/birds/classify?top_k=3", content=self.probe, headers={"Content-Type": "image/png"}
        )
        if r.status_code != 200:
            return f"the known-good request got {r.status_code}: {r.text[:300]}"
        body = r.json()
        got = {s["index"]: s["probability"] for s in body["results"][0]["top_k"]}
        if body["version"] != 1 or got != pytest.approx(dict(enumerate(self.expected.tolist())), abs=TOL):
            return f"the known-good request got v{body['version']} {got}, not v1 {self.expected.tolist()}"
        return None

    def assert_still_correct(self) -> None:
        problem = self.still_correct()
        assert problem is None, problem


@pytest.fixture(scope="module")
def served(world: TinyWorld, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The serving path as deployed: uploads validated and tried by the engine process, images decoded by
    the front ends, over the channel and shared memory."""
    store = make_store(world, tmp_path_factory.mktemp("hostile") / "store")
    running = start_processes(store, workers=2, max_image_pixels=MAX_PIXELS, max_body_bytes=8 * 1024 * 1024)
    probe_image = image(seed=123)
    try:
        with httpx.Client(base_url=running.url, timeout=120) as client:
            served = Served(client, store, world, encode(probe_image), world.reference("birds", probe_image))
            served.assert_still_correct()
            yield served
    finally:
        assert running.stop() == 0


@dataclass
class Corpus:
    uploads: list[UploadCase]
    images: list[ImageCase]
    marker: Path


@pytest.fixture(scope="module")
def corpus(world: TinyWorld, tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """Generated into a temp dir and read back: the tests run exactly what the script writes."""
    folder = tmp_path_factory.mktemp("corpus")
    marker = tmp_path_factory.mktemp("marker") / "PICKLE_RAN"
    art = world.artifacts["birds_v2"]  # a valid new version of birds
    valid = ValidArtifact(json.loads(art.manifest), dict(safetensors.numpy.load(art.tensors)))
    write_corpus(folder, valid, marker, MAX_PIXELS)
    uploads, images = load_corpus(folder)
    return Corpus(uploads, images, marker)


def decode_like_server(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img
