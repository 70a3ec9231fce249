"""What the engine guards while serving (issue 14, engine side): an upload is tried in a scratch slot on a
probe batch and refused unless its logits are finite; a non-finite output fails only its own rows with
500 `non_finite_output`; a domain deleted while its request was queued never comes back into the bank;
a deleted domain's metric series leave /metrics; and a front end's cached resolve never serves a version
that is no longer active."""

from __future__ import annotations

import copy

import httpx
import pytest
import torch

from adapters_store import LocalStore, manifest_to_json
from adapters_store.errors import DomainNotFound
from domain_format.preprocess import prepare
from model_artifacts import domain_artifact, validate_domain
from residual_adapters import AdapterConfig
from server.batcher import Batcher
from server.engine import Engine, EngineConfig
from server.errors import NonFiniteOutput
from tests.server.conftest import (
    PRE,
    PROVENANCE,
    TOL,
    Artifact,
    Processes,
    TinyWorld,
    auth,
    encode,
    image,
    reset_store,
)
from tests.server.test_processes import _connection_to  # a connection to one given front end

PNG = {"Content-Type": "image/png"}

BN_SCALE = 1e4
"""Every BN weight of the overflowing domain: within the validator's magnitude bound (1e4), yet with
running_var 0 each BN multiplies by 1e4 / sqrt(1e-5) ~ 3e6, and float32 overflows within a few layers."""


def overflowing_artifact(world: TinyWorld, domain: str = "poison") -> Artifact:
    """A BN-only domain whose every value passes validation but whose forward is not finite."""
    net = copy.deepcopy(world.net)
    net.add_domain(domain, AdapterConfig(kind="bn"), 3)
    with torch.no_grad():
        for key, t in net.domain_state(domain).items():
            if key.endswith("running_var"):
                t.zero_()
            elif key.endswith("weight") and "head" not in key:
                t.fill_(BN_SCALE)
            elif key.endswith(("bias", "running_mean")) and "head" not in key:
                t.fill_(1.0)
    manifest, tensors = domain_artifact(
        net, domain, labels=["a", "b", "c"], preprocessing=PRE, provenance=PROVENANCE, domain=domain
    )
    return Artifact(manifest_to_json(manifest), tensors)


def _files(art: Artifact) -> dict[str, tuple[str, bytes]]:
    return {"manifest": ("manifest.json", art.manifest), "tensors": ("adapter.safetensors", art.tensors)}


def test_the_overflowing_artifact_passes_validation(world: TinyWorld) -> None:
    """The premise of the tests below: only a forward shows what is wrong with it."""
    art = overflowing_artifact(world)
    validate_domain(art.manifest, art.tensors, world.net)


def test_an_upload_whose_probe_logits_are_not_finite_is_refused(
    client: httpx.Client, world: TinyWorld
) -> None:
    r = client.post("/v1/domains/poison/adapters", files=_files(overflowing_artifact(world)), headers=auth())
    assert r.status_code == 422, r.text
    problems = r.json()["error"]["problems"]
    assert [p["code"] for p in problems] == ["trial"] and "non-finite" in problems[0]["message"]
    assert client.get("/v1/domains/poison").status_code == 404  # nothing stored
    # a sound artifact is tried the same way and stored
    art = world.artifacts["birds_v2"]
    assert client.post("/v1/domains/birds/adapters", files=_files(art), headers=auth()).status_code == 201


def test_a_non_finite_output_fails_its_domain_with_500_never_200_with_nulls(
    client: httpx.Client, served_store: LocalStore, world: TinyWorld
) -> None:
    art = overflowing_artifact(world)
    served_store.put(validate_domain(art.manifest, art.tensors, world.net), activate=True)  # as the CLI could
    body = encode(image(4))
    r = client.post("/v1/classify", content=body, headers={**PNG, "X-Domain": "poison"})
    assert r.status_code == 500, r.text
    assert r.json()["error"]["code"] == "non_finite_output"
    assert client.post("/v1/classify", content=body, headers={**PNG, "X-Domain": "birds"}).status_code == 200


def test_non_finite_rows_fail_alone_in_a_mixed_batch(world: TinyWorld, store: LocalStore) -> None:
    art = overflowing_artifact(world)
    store.put(validate_domain(art.manifest, art.tensors, world.net), activate=True)
    engine = Engine(store, EngineConfig(bank_slots=4))
    batcher = Batcher(engine, max_domains_per_batch=4, max_batch_size=8, max_wait_ms=50)
    pixels = prepare(encode(image(6)), PRE.image_spec(), max_pixels=10**7)
    good, bad = engine.resolve("birds"), engine.resolve("poison")
    futures = [batcher.submit(k, [pixels], top_k=2)[0] for k in (good, bad, good)]
    batcher.start()  # all three queued first: one mixed batch
    try:
        first, poisoned, last = (f.exception(timeout=60) or f.result() for f in futures)
    finally:
        batcher.stop()
    assert isinstance(poisoned, NonFiniteOutput) and "poison v1" in str(poisoned)
    for pred in (first, last):
        assert not isinstance(pred, Exception) and pred.key == good
        assert all(0.0 <= s.probability <= 1.0 for s in pred.top)
    ref = world.reference("birds", image(6))
    assert [s.probability for s in first.top] == pytest.approx(ref.topk(2).values.tolist(), abs=TOL)


def test_a_domain_deleted_while_its_request_was_queued_is_never_loaded(
    world: TinyWorld, store: LocalStore
) -> None:
    engine = Engine(store, EngineConfig(bank_slots=2))
    key = engine.resolve("textures")
    engine.prefetch(key)  # what a front end's resolve does: the artifact is read ahead and staged
    store.delete_domain("textures")
    engine.evict("textures")  # what the engine does after the deletion
    with pytest.raises(DomainNotFound):
        engine.load(key)  # the queued request's batch: it must not bring the domain back
    assert key not in engine.resident()


def test_a_deleted_domains_series_leave_metrics(client: httpx.Client) -> None:
    assert client.post(
        "/v1/classify", content=encode(image(2)), headers={**PNG, "X-Domain": "digits"}
    ).is_success

    def digits_series() -> list[str]:
        text = client.get("/metrics").text
        return [line for line in text.splitlines() if 'domain="digits"' in line]

    assert any(line.startswith("md_requests_total") for line in digits_series())  # the check can fail
    assert client.delete("/v1/domains/digits", headers=auth()).status_code == 200
    assert digits_series() == []
    text = client.get("/metrics").text
    assert 'domain=""' in text  # series of no domain (this very route) are kept


def test_an_activation_through_one_front_end_is_served_by_the_others_at_once(
    processes: Processes, world: TinyWorld
) -> None:
    """Front ends cache resolves; the engine checks them, so a cached v1 never serves after v2 is active."""
    with httpx.Client(base_url=processes.url) as any_client:
        reset_store(world, any_client, processes.store, ("birds",))
    first, second = processes.pids("frontend").values()
    a, b = _connection_to(processes.url, first), _connection_to(processes.url, second)
    img = image(33)
    try:
        for version, name in ((1, "birds"), (2, "birds_v2")):
            if version == 2:
                r = a.post(
                    "/v1/domains/birds/adapters", files=_files(world.artifacts["birds_v2"]),
                    headers=auth(), params={"activate": "true"},
                )  # fmt: skip
                assert r.status_code == 201, r.text
            answer = b.post("/v1/classify", content=encode(img), headers={**PNG, "X-Domain": "birds"})
            assert answer.status_code == 200 and answer.headers["x-md-frontend"] == str(second)
            assert answer.json()["version"] == version
            got = [e["probability"] for e in answer.json()["results"][0]["top_k"]]
            assert got == pytest.approx(sorted(world.reference(name, img).tolist(), reverse=True), abs=TOL)
        # and a rollback through a is seen by b as well
        assert a.put("/v1/domains/birds/active", json={"rollback": True}, headers=auth()).status_code == 200
        answer = b.post("/v1/classify", content=encode(img), headers={**PNG, "X-Domain": "birds"})
        assert answer.status_code == 200 and answer.json()["version"] == 1
    finally:
        a.close()
        b.close()


def test_version_numbers_beyond_the_channel_are_refused_with_422(client: httpx.Client) -> None:
    """Numbers cross the engine channel as 64-bit integers: a version outside 1..2**63-1 is a 422, never
    a 500 (the schema fuzz found GET /v2/models/{domain}/versions/2**64 answering 500 over processes)."""
    huge = 2**64
    answers = [
        client.get(f"/v2/models/birds/versions/{huge}"),
        client.post(f"/v1/domains/birds/versions/{huge}/classify", content=encode(image(1)), headers=PNG),
        client.post(f"/v1/domains/birds/versions/{-huge}/classify", content=encode(image(1)), headers=PNG),
        client.delete(f"/v1/domains/birds/versions/{huge}", headers=auth()),
        client.put("/v1/domains/birds/active", json={"version": huge}, headers=auth()),
    ]
    assert [r.status_code for r in answers] == [422] * 5, [r.text for r in answers]
