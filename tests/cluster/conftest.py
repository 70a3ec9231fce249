"""Fixtures: three real `multidomain serve` replicas on one shared S3 store (the session's SeaweedFS) behind a
real HAProxy, every process on 127.0.0.1 and stopped by its PID (`deploy/cluster.py`, the launcher `make
cluster` uses).

The store holds the server tests' tiny resnet26 world (width 0.125, 24 px) with domains digits and
textures; tests upload more. Replicas poll the store's revision on every request (`MD_REVISION_POLL_S=0`),
so a change made through one replica is seen by the next request to any other: no waiting.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import psutil
import pytest
from PIL import Image

from adapters_store import DomainManifest, manifest_to_json, open_store
from adapters_store.copy import copy_store
from adapters_store.seaweedfs import SeaweedFS
from deploy.cluster import Cluster, ClusterConfig
from tests.conftest import s3_url
from tests.server.conftest import ADMIN, TOL, TinyWorld, encode, image, make_store, world

# `world` is re-exported (pytest finds the fixture through this module); the rest for the tests.
__all__ = ["ADMIN", "TOL", "encode", "image", "world"]


@pytest.fixture(scope="package")
def cluster(
    world: TinyWorld, seaweed: SeaweedFS, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    url = s3_url("cluster")
    with pytest.MonkeyPatch.context() as env:
        # The S3 settings in this process too: the tests read the store the replicas write.
        for name, value in seaweed.env.items():
            env.setenv(name, value)
        copy_store(make_store(world, root / "seed", domains=("digits", "textures")), open_store(url))
        config = ClusterConfig(
            store=url,
            work_dir=root / "run",
            bootstrap=False,
            replica_env={
                **seaweed.env,
                "MD_ADMIN_TOKEN": ADMIN,
                "MD_REVISION_POLL_S": "0",
                "MD_BANK_SLOTS": "4",
                "MD_MAX_WAIT_MS": "2",
                "MD_DEVICE": "cpu",
                "MD_TORCH_THREADS": "1",
                "MD_DECODE_THREADS": "1",
            },
        )
        with Cluster(config) as running:
            yield running


def renamed(manifest: bytes, domain: str) -> bytes:
    """The same artifact under another domain name (the tensors' checksum does not cover the name)."""
    return manifest_to_json(
        DomainManifest.model_validate_json(manifest).model_copy(update={"domain": domain})
    )


def upload(
    client: httpx.Client, domain: str, manifest: bytes, tensors: bytes, activate: bool = True
) -> httpx.Response:
    return client.post(
        f"/v1/domains/{domain}/adapters",
        params={"activate": str(activate).lower()},
        files={"manifest": ("manifest.json", manifest), "tensors": ("adapter.safetensors", tensors)},
        headers={"Authorization": f"Bearer {ADMIN}"},
    )


def probabilities(body: dict) -> dict[int, float]:
    return {s["index"]: s["probability"] for s in body["results"][0]["top_k"]}


def expected(world: TinyWorld, reference: str, img: Image.Image) -> dict[int, float]:
    """The model library's own answer for `reference` (a world domain, e.g. "birds_v2"), every class."""
    return dict(enumerate(world.reference(reference, img).tolist()))


def classify(client: httpx.Client, domain: str, png: bytes) -> httpx.Response:
    """Every class's probability (top_k 5 covers the world's largest head)."""
    return client.post(
        f"/v1/domains/{domain}/classify",
        params={"top_k": 5},
        content=png,
        headers={"Content-Type": "image/png"},
    )


def answer_problem(r: httpx.Response, version: int, want: dict[int, float]) -> str | None:
    """None when `r` is a 200 from `version` whose probabilities are `want` (within TOL), else what is wrong."""
    if r.status_code != 200:
        return f"status {r.status_code}: {r.text[:200]}"
    body = r.json()
    got = probabilities(body)
    if body["version"] != version:
        return f"version {body['version']}, expected {version}"
    if set(got) != set(want) or any(abs(got[k] - want[k]) > TOL for k in want):
        return f"probabilities {got}, expected {want}"
    return None


def engine_pids(cluster: Cluster, index: int) -> list[int]:
    """Replica `index`'s engine process(es): stopping one (SIGSTOP) makes its front ends hold requests
    (read whole, never answered), which the balancer counts against that replica."""
    process = cluster.replicas[index]
    assert process is not None
    children = psutil.Process(process.pid).children(recursive=True)
    return [p.pid for p in children if "server.engine_process" in " ".join(p.cmdline())]
