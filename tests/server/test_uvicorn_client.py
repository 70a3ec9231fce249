"""Against a real uvicorn on a free loopback port, through the Python client: upload -> classify in the new
domain -> activate an older version -> classify again; the client's error types."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from multidomain_client import AuthError, InvalidArtifact, MultidomainClient, NotFound, ServerResponseError

from adapters_store import pack_bundle
from server.app import create_app
from server.serving import ServerThread
from tests.server.conftest import (
    ADMIN,
    TOL,
    Processes,
    TinyWorld,
    encode,
    image,
    make_store,
    reset_store,
    settings_for,
)


@pytest.fixture(params=["thread", "processes"])
def server(
    request: pytest.FixtureRequest, world: TinyWorld, tmp_path: Path
) -> Iterator[ServerThread | Processes]:
    """uvicorn in a thread of this process, and the multi-process server (one per module)."""
    if request.param == "thread":
        store = make_store(world, tmp_path / "store", domains=("digits",))
        with ServerThread(create_app(settings_for(store))) as running:
            yield running
        return
    served: Processes = request.getfixturevalue("processes")
    with httpx.Client(base_url=served.url, timeout=60) as http:
        reset_store(world, http, served.store, ("digits",))
    yield served


def _probs(answer: dict) -> list[float]:
    return [e["probability"] for e in answer["results"][0]["top_k"]]


def test_upload_classify_activate_older_classify_again(
    server: ServerThread | Processes, world: TinyWorld
) -> None:
    img = image(21)
    with MultidomainClient(server.url, token=ADMIN) as client:
        assert client.ready()["status"] == "ready"
        v1, v2 = world.artifacts["birds"], world.artifacts["birds_v2"]
        assert client.upload("birds", v1.manifest, v1.tensors, activate=True)["version"] == 1
        assert client.upload_bundle("birds", pack_bundle(v2.manifest, v2.tensors))["version"] == 2
        answer = client.classify("birds", encode(img), top_k=3)
        assert answer["version"] == 2
        assert _probs(answer) == pytest.approx(
            world.reference("birds_v2", img).sort(descending=True).values.tolist(), abs=TOL
        )
        assert client.activate("birds", 1) == 1
        answer = client.classify("birds", [encode(img), encode(image(22))], top_k=3)
        assert answer["version"] == 1 and len(answer["results"]) == 2
        assert _probs(answer) == pytest.approx(
            world.reference("birds", img).sort(descending=True).values.tolist(), abs=TOL
        )
        listing = {d["domain"]: d for d in client.list_domains()}
        assert listing["birds"]["versions"] == [1, 2] and listing["birds"]["active"] == 1
        assert listing["birds"]["resident"] is True
        client.delete("birds", 2)
        assert client.describe("birds")["versions"] == [1]


def test_client_errors_carry_status_code_and_message(
    server: ServerThread | Processes, world: TinyWorld
) -> None:
    with (
        MultidomainClient(server.url, token="wrong") as bad,
        MultidomainClient(server.url, token=ADMIN) as good,
    ):
        art = world.artifacts["birds"]
        with pytest.raises(AuthError) as auth:
            bad.upload("birds", art.manifest, art.tensors)
        assert auth.value.status == 403 and auth.value.code == "forbidden"
        with pytest.raises(NotFound) as missing:
            good.classify("zebras", encode(image()))
        assert missing.value.code == "domain_not_found" and "zebras" in missing.value.message
        with pytest.raises(InvalidArtifact) as invalid:
            good.upload("birds", art.manifest, art.tensors[:-4] + b"\x00\x00\x00\x00")
        assert "checksum" in {p["code"] for p in invalid.value.problems}
        with pytest.raises(ServerResponseError) as unsupported:
            good.classify("digits", b"not an image")
        assert unsupported.value.status == 415


def test_client_error_text_names_the_servers_reasons(server: ServerThread, world: TinyWorld) -> None:
    """What `multidomain train adapter --upload` prints is `str(exc)`: it must say why, not only that."""
    art = world.artifacts["birds"]
    with MultidomainClient(server.url, token=ADMIN) as client, pytest.raises(InvalidArtifact) as refused:
        client.upload("animals", art.manifest, art.tensors)
    text = str(refused.value)
    assert text.startswith("422 invalid_artifact: the artifact was refused: ")
    assert "manifest.domain: the manifest is for domain 'birds', uploaded to 'animals'" in text
    assert [p["code"] for p in refused.value.problems] == ["domain"]


def test_client_error_text_lists_every_problem_up_to_a_bound() -> None:
    """Ten reasons are named and the rest counted: one per tensor could fill a terminal."""
    problems = [{"field": f"tensors.t{i}", "message": "wrong shape", "code": "shape"} for i in range(12)]
    error = InvalidArtifact(422, "invalid_artifact", "the artifact was refused", {"problems": problems})
    text = str(error)
    assert "tensors.t0: wrong shape; " in text and "tensors.t9: wrong shape; and 2 more" in text
    assert "tensors.t10" not in text
    plain = ServerResponseError(404, "domain_not_found", "no domain 'zebras'")
    assert str(plain) == "404 domain_not_found: no domain 'zebras'"
