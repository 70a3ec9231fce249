"""Every kind of bad input gets a clear 4xx JSON error, and the server keeps answering correctly after."""

from __future__ import annotations

import inspect
import io
import zlib
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from httpx import Response
from PIL import Image

from adapters_store import LocalStore
from server.app import create_app
from server.settings import Settings
from tests.server.conftest import (
    TOL,
    Processes,
    TinyWorld,
    auth,
    encode,
    image,
    make_store,
    settings_for,
    start_processes,
)

PNG = {"Content-Type": "image/png"}


def _error(r: Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return body["error"]


STRICT: dict[str, object] = {
    "max_body_bytes": 20_000,
    "max_image_pixels": 100_000,
    "inference_token": "infer-secret",
    "max_queue": 4,
}


@pytest.fixture(scope="module")
def strict_processes(world: TinyWorld, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    running = start_processes(make_store(world, tmp_path_factory.mktemp("strict") / "store"), **STRICT)
    yield running
    assert running.stop() == 0


@pytest.fixture(params=["in_process", "processes"])
def strict(request: pytest.FixtureRequest, store: LocalStore) -> Iterator[httpx.Client]:
    """Small limits, and inference behind a token (the tests using it leave the store as it is)."""
    if request.param == "in_process":
        with TestClient(create_app(settings_for(store, **STRICT))) as c:
            yield c
        return
    served: Processes = request.getfixturevalue("strict_processes")
    with httpx.Client(base_url=served.url, timeout=60) as c:
        yield c


INFER = auth("infer-secret")


def _bomb() -> bytes:
    """A 4000x4000 PNG of zeros: tiny on the wire, 16 M pixels once decoded."""
    out = io.BytesIO()
    Image.new("L", (4000, 4000)).save(out, format="PNG", optimize=True)
    return out.getvalue()


def test_every_error_handler_runs_on_the_event_loop() -> None:
    # Starlette sends a plain `def` handler through its thread pool: a thread hop for every refusal,
    # which a flood of bad or shed requests (429) pays on the front end's one event loop
    handlers = create_app(Settings()).exception_handlers
    assert handlers
    sync = [h.__name__ for h in handlers.values() if not inspect.iscoroutinefunction(h)]
    assert sync == []


def test_missing_domain_header(client: httpx.Client) -> None:
    _error(client.post("/v1/classify", content=encode(image()), headers=PNG), 400, "missing_domain")


def test_unknown_domain(client: httpx.Client) -> None:
    err = _error(
        client.post("/v1/classify", content=encode(image()), headers={**PNG, "X-Domain": "zebras"}),
        404,
        "domain_not_found",
    )
    assert "zebras" in err["message"]


def test_hostile_domain_name_is_just_unknown(client: httpx.Client) -> None:
    r = client.post("/v1/classify", content=encode(image()), headers={**PNG, "X-Domain": "../../etc"})
    _error(r, 404, "domain_not_found")


def test_not_an_image(client: httpx.Client) -> None:
    r = client.post("/v1/classify", content=b"GIF89a not really", headers={**PNG, "X-Domain": "birds"})
    err = _error(r, 415, "unsupported_media_type")
    assert "image/png" in err["accepted"]


def test_unsupported_content_type(client: httpx.Client) -> None:
    r = client.post(
        "/v1/classify", content=b"hello", headers={"Content-Type": "text/plain", "X-Domain": "birds"}
    )
    _error(r, 415, "unsupported_media_type")


def test_corrupt_image(client: httpx.Client) -> None:
    data = encode(image(size=(64, 64)))
    r = client.post("/v1/classify", content=data[: len(data) // 2], headers={**PNG, "X-Domain": "birds"})
    _error(r, 422, "corrupt_image")


def test_decompression_bomb(strict: httpx.Client) -> None:
    bomb = _bomb()
    assert len(bomb) < 20_000  # under the body limit: only the pixel limit can stop it
    err = _error(
        strict.post("/v1/classify", content=bomb, headers={**PNG, "X-Domain": "birds", **INFER}),
        413,
        "too_many_pixels",
    )
    assert err["max_pixels"] == 100_000


def test_oversized_body_by_content_length(strict: httpx.Client) -> None:
    r = strict.post("/v1/classify", content=b"x" * 30_000, headers={**PNG, "X-Domain": "birds", **INFER})
    _error(r, 413, "body_too_large")


def test_oversized_body_streamed_without_length(strict: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:  # chunked transfer: no Content-Length, refused while reading
        for _ in range(10):
            yield b"\x89PNG" + b"x" * 4000

    r = strict.post("/v1/classify", content=chunks(), headers={**PNG, "X-Domain": "birds", **INFER})
    _error(r, 413, "body_too_large")


def test_bad_base64_and_bad_json(client: httpx.Client) -> None:
    h = {"X-Domain": "birds"}
    _error(client.post("/v1/classify", json={"images": ["***"]}, headers=h), 400, "bad_request")
    _error(client.post("/v1/classify", json={"pictures": []}, headers=h), 400, "bad_request")


def test_fastapi_own_errors_are_json(client: httpx.Client) -> None:
    _error(client.get("/v1/nothing-here"), 404, "not_found")
    _error(client.delete("/v1/classify"), 405, "method_not_allowed")
    err = _error(
        client.post("/v1/domains/birds/classify", params={"top_k": 0}, content=b"", headers=PNG),
        422,
        "invalid_request",
    )
    assert err["problems"][0]["field"] == "query.top_k"


def test_missing_and_wrong_inference_token(strict: httpx.Client) -> None:
    h = {**PNG, "X-Domain": "birds"}
    _error(strict.post("/v1/classify", content=encode(image()), headers=h), 401, "unauthorized")
    _error(
        strict.post("/v1/classify", content=encode(image()), headers={**h, **auth("nope")}), 403, "forbidden"
    )
    assert strict.post("/v1/classify", content=encode(image()), headers={**h, **INFER}).status_code == 200
    _error(strict.get("/v1/domains"), 401, "unauthorized")  # listing is inference-level too
    assert strict.get("/v1/domains/birds", headers=INFER).status_code == 200


def test_missing_and_wrong_admin_token(client: httpx.Client, world: TinyWorld) -> None:
    art = world.artifacts["birds_v2"]
    files = {"manifest": ("manifest.json", art.manifest), "tensors": ("adapter.safetensors", art.tensors)}
    _error(client.post("/v1/domains/birds/adapters", files=files), 401, "unauthorized")
    _error(client.post("/v1/domains/birds/adapters", files=files, headers=auth("wrong")), 403, "forbidden")
    _error(
        client.put("/v1/domains/birds/active", json={"version": 1}, headers=auth("wrong")), 403, "forbidden"
    )
    _error(client.delete("/v1/domains/birds", headers={"Authorization": "Basic abc"}), 401, "unauthorized")
    assert client.get("/v1/domains/birds").json()["versions"] == [1]  # nothing changed


def test_admin_disabled_without_a_token(store: LocalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MD_ADMIN_TOKEN", "  ")  # blank in the environment means unset
    assert Settings().admin_token is None
    with TestClient(create_app(settings_for(store, admin_token=None))) as c:
        _error(c.delete("/v1/domains/birds", headers=auth()), 403, "forbidden")


def test_invalid_upload_lists_the_validator_reasons(client: httpx.Client, world: TinyWorld) -> None:
    art = world.artifacts["birds_v2"]
    broken = art.tensors[:-8] + b"\x00" * 8  # same size, different bytes: the checksum no longer matches
    files = {"manifest": ("manifest.json", art.manifest), "tensors": ("adapter.safetensors", broken)}
    err = _error(
        client.post("/v1/domains/birds/adapters", files=files, headers=auth()), 422, "invalid_artifact"
    )
    assert "checksum" in {p["code"] for p in err["problems"]}
    # an artifact for another domain, uploaded under this one
    other = world.artifacts["digits"]
    files = {"manifest": ("manifest.json", other.manifest), "tensors": ("adapter.safetensors", other.tensors)}
    err = _error(
        client.post("/v1/domains/birds/adapters", files=files, headers=auth()), 422, "invalid_artifact"
    )
    assert [p["field"] for p in err["problems"]] == ["manifest.domain"]
    # a pickle is refused by name
    files = {"manifest": ("manifest.json", art.manifest), "tensors": ("adapter.pt", art.tensors)}
    _error(client.post("/v1/domains/birds/adapters", files=files, headers=auth()), 422, "invalid_artifact")
    assert client.get("/v1/domains/birds").json()["versions"] == [1]


def test_queue_full_answers_429_with_retry_after(strict: httpx.Client) -> None:
    files = [
        ("file", (f"{i}.png", encode(image(i, (8, 8))), "image/png")) for i in range(5)
    ]  # 5 > queue of 4
    r = strict.post("/v1/classify", files=files, headers={"X-Domain": "birds", **INFER})
    _error(r, 429, "queue_full")
    assert int(r.headers["Retry-After"]) >= 1


def test_server_still_answers_correctly_after_bad_input(client: httpx.Client, world: TinyWorld) -> None:
    h = {**PNG, "X-Domain": "birds"}
    for bad in (b"", b"garbage", encode(image())[:40], zlib.compress(b"x" * 1000)):
        assert 400 <= client.post("/v1/classify", content=bad, headers=h).status_code < 500
    img = image(9)
    r = client.post("/v1/classify", content=encode(img), headers=h)
    assert r.status_code == 200
    ref = world.reference("birds", img)
    assert r.json()["results"][0]["top_k"][0]["index"] == int(ref.argmax())
    assert r.json()["results"][0]["top_k"][0]["probability"] == pytest.approx(float(ref.max()), abs=TOL)


def test_extreme_aspect_ratio_is_refused_by_its_resized_size(strict: httpx.Client) -> None:
    strip = encode(Image.new("RGB", (5000, 1), (50, 100, 150)))  # 5000 pixels; 140000x28 once resized
    err = _error(
        strict.post("/v1/classify", content=strip, headers={**PNG, "X-Domain": "birds", **INFER}),
        413,
        "too_many_pixels",
    )
    assert "resized" in err["message"]


def test_requests_beyond_the_in_flight_limit_get_429_before_their_body_is_read(store: LocalStore) -> None:
    import threading

    with TestClient(create_app(settings_for(store, max_requests_in_flight=1))) as c:
        engine = c.app.state.frontend.engines.service.engine  # type: ignore[attr-defined]
        entered, release = threading.Event(), threading.Event()
        infer = engine.infer

        def held_infer(*args: object, **kwargs: object) -> object:
            entered.set()
            release.wait()  # keep the first request in flight until the second has been refused
            return infer(*args, **kwargs)

        engine.infer = held_infer
        first: list[Response] = []
        h = {**PNG, "X-Domain": "birds"}
        t = threading.Thread(
            target=lambda: first.append(c.post("/v1/classify", content=encode(image()), headers=h))
        )
        t.start()
        entered.wait()
        r = c.post("/v1/classify", content=encode(image()), headers=h)
        release.set()
        t.join()
        _error(r, 429, "queue_full")
        assert first[0].status_code == 200
        assert c.post("/v1/classify", content=encode(image()), headers=h).status_code == 200  # slot freed
