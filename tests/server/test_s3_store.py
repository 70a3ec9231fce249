"""The server on a shared S3 store (SeaweedFS): two apps as two replicas of one store.

An upload through one is served by the other after its revision poll; activation, rollback and
deletion are seen by both; the answers match the reference network.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adapters_store import open_store
from adapters_store.copy import copy_store
from adapters_store.s3 import S3Store
from adapters_store.seaweedfs import SeaweedFS
from server.app import create_app
from server.settings import Settings
from tests.conftest import s3_url
from tests.server.conftest import ADMIN, TOL, TinyWorld, auth, encode, image, make_store

PNG = {"Content-Type": "image/png"}


def _settings(url: str) -> Settings:
    return Settings(
        store_url=url, admin_token=ADMIN, bank_slots=4, max_wait_ms=2.0, revision_poll_s=0.0, decode_threads=1
    )  # type: ignore[arg-type]


def _classify(client: TestClient, domain: str) -> tuple[int, list[float]]:
    r = client.post(f"/v1/domains/{domain}/classify", content=encode(image(11)), headers=PNG)
    assert r.status_code == 200, r.text
    return r.json()["version"], [e["probability"] for e in r.json()["results"][0]["top_k"]]


def test_two_replicas_on_one_s3_store(world: TinyWorld, tmp_path: Path, s3_env: SeaweedFS) -> None:
    url = s3_url()
    copy_store(make_store(world, tmp_path / "seed", domains=("birds",)), open_store(url))
    assert isinstance(open_store(url), S3Store)
    with TestClient(create_app(_settings(url))) as a, TestClient(create_app(_settings(url))) as b:
        ref_v1 = sorted(world.reference("birds", image(11)).tolist(), reverse=True)
        for replica in (a, b):
            version, probs = _classify(replica, "birds")
            assert version == 1 and probs == pytest.approx(ref_v1, abs=TOL)
        art = world.artifacts["birds_v2"]
        files = {"manifest": ("manifest.json", art.manifest), "tensors": ("adapter.safetensors", art.tensors)}
        r = a.post("/v1/domains/birds/adapters?activate=true", files=files, headers=auth())
        assert r.status_code == 201 and r.json()["version"] == 2, r.text
        ref_v2 = sorted(world.reference("birds_v2", image(11)).tolist(), reverse=True)
        version, probs = _classify(b, "birds")  # the other replica, after its revision poll
        assert version == 2 and probs == pytest.approx(ref_v2, abs=TOL)
        assert (
            b.put("/v1/domains/birds/active", json={"rollback": True}, headers=auth()).json()["active"] == 1
        )
        assert _classify(a, "birds")[0] == 1
        assert a.delete("/v1/domains/birds/versions/2", headers=auth()).status_code == 200
        assert b.get("/v1/domains").json()["domains"][0]["versions"] == [1]


def test_serve_takes_an_s3_url_for_its_store() -> None:
    import argparse

    from multidomain import serve_cli as cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    settings = cli.settings_from_args(parser.parse_args(["serve", "--store", "s3://models/prod"]))
    assert settings.store_url == "s3://models/prod" and settings.store_location == "s3://models/prod"
    assert cli.serve_environment(settings, base={})["MD_STORE_URL"] == "s3://models/prod"
    local = cli.settings_from_args(parser.parse_args(["serve", "--store", "some/dir"]))
    assert local.store_url is None and local.store_location == Path("some/dir")


@pytest.mark.parametrize("url", ["s3://ab/prefix", "http://bucket/x", "s3:///nobucket"])
def test_a_malformed_store_url_is_refused_at_startup(url: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="store_url"):
        Settings(store_url=url)  # type: ignore[call-arg]
