"""Adapter upload, activation, rollback and deletion through the API, and changes made by other processes."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from adapters_store import LocalStore, pack_bundle
from model_artifacts import validate_domain
from server.app import create_app
from tests.server.conftest import TOL, TinyWorld, auth, encode, image, make_store, reset_store, settings_for

PNG = {"Content-Type": "image/png"}


def _top(client: httpx.Client, domain: str, seed: int = 11) -> tuple[int, list[float]]:
    r = client.post("/v1/classify", content=encode(image(seed)), headers={**PNG, "X-Domain": domain})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["version"], [e["probability"] for e in body["results"][0]["top_k"]]


def _upload(client: httpx.Client, world: TinyWorld, name: str, **params: object) -> dict:
    art = world.artifacts[name]
    files = {"manifest": ("manifest.json", art.manifest), "tensors": ("adapter.safetensors", art.tensors)}
    r = client.post(f"/v1/domains/{name.split('_')[0]}/adapters", files=files, headers=auth(), params=params)
    assert r.status_code == 201, r.text
    return r.json()


def test_upload_activate_rollback_delete(client: httpx.Client, world: TinyWorld) -> None:
    v1, p1 = _top(client, "birds")
    assert v1 == 1
    assert _upload(client, world, "birds_v2") == {"domain": "birds", "version": 2, "active": False}
    assert _top(client, "birds") == (1, p1)  # stored, not active: still version 1
    r = client.put("/v1/domains/birds/active", json={"version": 2}, headers=auth())
    assert r.json() == {"domain": "birds", "active": 2}
    v2, p2 = _top(client, "birds")
    assert v2 == 2 and p2 != pytest.approx(p1)
    img = image(11)
    ref = world.reference("birds_v2", img)
    assert p2 == pytest.approx(sorted(ref.tolist(), reverse=True), abs=TOL)
    # roll back, then delete the inactive version 2
    assert (
        client.put("/v1/domains/birds/active", json={"rollback": True}, headers=auth()).json()["active"] == 1
    )
    assert _top(client, "birds") == (1, pytest.approx(p1, abs=TOL))
    assert client.delete("/v1/domains/birds/versions/2", headers=auth()).status_code == 200
    assert client.get("/v1/domains/birds").json()["versions"] == [1]
    # the active version cannot be deleted; the whole domain can
    assert client.delete("/v1/domains/birds/versions/1", headers=auth()).json()["error"]["code"] == "conflict"
    assert client.delete("/v1/domains/birds", headers=auth()).status_code == 200
    r = client.post("/v1/classify", content=encode(img), headers={**PNG, "X-Domain": "birds"})
    assert r.status_code == 404
    assert "birds" not in [d["domain"] for d in client.get("/v1/domains").json()["domains"]]


def test_bundle_upload_with_activate_creates_a_new_domain(
    client: httpx.Client, world: TinyWorld, served_store: LocalStore
) -> None:
    reset_store(world, client, served_store, ("digits",))
    art = world.artifacts["birds"]
    bundle = pack_bundle(art.manifest, art.tensors)
    r = client.post(
        "/v1/domains/birds/adapters",
        content=bundle,
        headers={**auth(), "Content-Type": "application/x-tar"},
        params={"activate": "true"},
    )
    assert r.status_code == 201, r.text
    assert r.json() == {"domain": "birds", "version": 1, "active": True}
    version, probs = _top(client, "birds")
    ref = world.reference("birds", image(11))
    assert version == 1 and probs == pytest.approx(sorted(ref.tolist(), reverse=True), abs=TOL)


def test_activation_by_another_process_is_noticed(
    client: httpx.Client, world: TinyWorld, served_store: LocalStore
) -> None:
    assert _top(client, "birds")[0] == 1
    other = LocalStore(served_store.root)  # another writer on the same directory (e.g. the store CLI)

    art = world.artifacts["birds_v2"]
    other.put(validate_domain(art.manifest, art.tensors, world.net), activate=True)
    assert _top(client, "birds")[0] == 2
    other.activate("birds", 1)
    assert _top(client, "birds")[0] == 1


def test_activate_request_must_name_one_thing(client: httpx.Client) -> None:
    r = client.put("/v1/domains/birds/active", json={"version": 1, "rollback": True}, headers=auth())
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
    r = client.put("/v1/domains/birds/active", json={"version": 9}, headers=auth())
    assert r.status_code == 404 and r.json()["error"]["code"] == "version_not_found"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/v1/domains/birds/active"),
        ("POST", "/v1/domains/birds/adapters"),
        ("DELETE", "/v1/domains/birds/versions/1"),
        ("DELETE", "/v1/domains/birds"),
    ],
)
def test_admin_routes_check_the_token_before_parsing_the_body(
    client: TestClient, method: str, path: str
) -> None:
    # A malformed body without a token: 401 (the body is never looked at), not 422 naming the JSON error.
    headers = {"Content-Type": "application/json"}
    r = client.request(method, path, content=b"{not json", headers=headers)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "unauthorized"
    # With the token the same body is refused for what it is.
    if method == "PUT":
        r = client.request(method, path, content=b"{not json", headers={**headers, **auth()})
        assert r.status_code == 422, r.text
        r = client.request(method, path, content=b'{"version": "x"}', headers={**headers, **auth()})
        assert r.status_code == 422 and "version" in r.text, r.text


def test_an_upload_into_a_store_with_a_symlinked_tmp_is_refused_and_deletes_nothing(
    client: httpx.Client, world: TinyWorld, served_store: LocalStore, tmp_path: Path
) -> None:
    store = served_store
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "keep.txt").write_text("precious")
    (victim / "sub" / "deep.txt").write_text("precious too")
    (store.root / "tmp").rmdir()
    (store.root / "tmp").symlink_to(victim, target_is_directory=True)
    art = world.artifacts["birds_v2"]
    files = {"manifest": ("manifest.json", art.manifest), "tensors": ("adapter.safetensors", art.tensors)}
    r = client.post("/v1/domains/birds/adapters", files=files, headers=auth())
    assert r.status_code == 500
    assert (
        r.json()["error"]["code"] == "store_symlink"
        and "tmp is a symbolic link" in r.json()["error"]["message"]
    )
    assert (victim / "keep.txt").read_text() == "precious" and (victim / "sub" / "deep.txt").exists()
    assert client.get("/v1/domains/birds").json()["versions"] == [1]


def _upload_status(client: httpx.Client, world: TinyWorld, name: str, domain: str) -> tuple[int, dict]:
    art = world.artifacts[name]
    files = {"manifest": ("manifest.json", art.manifest), "tensors": ("adapter.safetensors", art.tensors)}
    r = client.post(f"/v1/domains/{domain}/adapters", files=files, headers=auth())
    return r.status_code, r.json()


def test_quotas_refuse_uploads_with_409_naming_the_limit(world: TinyWorld, tmp_path: Path) -> None:
    store = make_store(world, tmp_path / "s", domains=("birds", "digits"))
    settings = settings_for(store, max_versions_per_domain=1, max_domains=2)
    with TestClient(create_app(settings)) as client:
        status, body = _upload_status(client, world, "birds_v2", "birds")
        assert status == 409, body
        assert body["error"]["code"] == "quota_exceeded"
        assert (body["error"]["limit"], body["error"]["value"]) == ("max_versions_per_domain", 1)
        assert "max_versions_per_domain=1" in body["error"]["message"]
        status, body = _upload_status(client, world, "textures", "textures")
        assert status == 409 and body["error"]["limit"] == "max_domains"
        assert client.get("/v1/domains/birds").json()["versions"] == [1]
        assert [d["domain"] for d in client.get("/v1/domains").json()["domains"]] == ["birds", "digits"]
        # Room made, the same upload goes through.
        assert client.delete("/v1/domains/digits", headers=auth()).status_code == 200
        assert _upload_status(client, world, "textures", "textures")[0] == 201


def test_class_and_input_size_limits_come_from_the_settings(world: TinyWorld, tmp_path: Path) -> None:
    # birds_v2 has 3 classes and input_size 24 (resize 28): one below each limit is refused with 422
    # naming the field, at the limit it is stored.
    store = make_store(world, tmp_path / "s", domains=("birds",))
    for overrides, field in (({"max_classes": 2}, "manifest.labels"), ({"max_input_size": 23}, "input_size")):
        with TestClient(create_app(settings_for(store, **overrides))) as client:
            status, body = _upload_status(client, world, "birds_v2", "birds")
            assert status == 422, body
            assert body["error"]["code"] == "invalid_artifact"
            assert any(field in p["field"] for p in body["error"]["problems"]), body
            assert client.get("/v1/domains/birds").json()["versions"] == [1]
    with TestClient(create_app(settings_for(store, max_classes=3, max_input_size=24))) as client:
        assert _upload_status(client, world, "birds_v2", "birds")[0] == 201


def test_store_bytes_quota_from_the_settings(world: TinyWorld, tmp_path: Path) -> None:
    store = make_store(world, tmp_path / "s", domains=("birds",))
    with TestClient(create_app(settings_for(store, max_store_bytes=1))) as client:
        status, body = _upload_status(client, world, "birds_v2", "birds")
        assert status == 409 and (body["error"]["limit"], body["error"]["value"]) == ("max_store_bytes", 1)


class _CountingStore(LocalStore):
    """A real LocalStore that counts how often it reads its index."""

    index_reads = 0

    def _read_index(self):  # type: ignore[no-untyped-def]
        type(self).index_reads += 1
        return super()._read_index()


def test_listing_domains_reads_the_index_once(world: TinyWorld, tmp_path: Path) -> None:
    root = make_store(world, tmp_path / "s").root
    store = _CountingStore(root)
    with TestClient(create_app(settings_for(store), store=store)) as client:
        _CountingStore.index_reads = 0
        listing = client.get("/v1/domains").json()["domains"]
        assert len(listing) == 3 and _CountingStore.index_reads == 1
        assert {d["domain"]: d["versions"] for d in listing} == {"birds": [1], "digits": [1], "textures": [1]}
