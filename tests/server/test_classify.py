"""Classification through the HTTP API: every body form, answers checked against the model library."""

from __future__ import annotations

import base64

import httpx
import pytest
import torch

from tests.server.conftest import TOL, TinyWorld, encode, image


def _probs(body: dict) -> dict[int, float]:
    return {e["index"]: e["probability"] for e in body["top_k"]}


@pytest.mark.parametrize("domain", ["birds", "digits", "textures"])
def test_raw_image_matches_the_reference_forward(client: httpx.Client, world: TinyWorld, domain: str) -> None:
    img = image(1)
    r = client.post(
        "/v1/classify", content=encode(img), headers={"X-Domain": domain, "Content-Type": "image/png"}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["domain"] == domain and body["version"] == 1
    [result] = body["results"]
    ref = world.reference(domain, img)
    k = min(5, ref.numel())
    assert len(result["top_k"]) == k
    top = ref.topk(k)
    assert [e["index"] for e in result["top_k"]] == top.indices.tolist()
    for e, p in zip(result["top_k"], top.values.tolist(), strict=True):
        assert e["probability"] == pytest.approx(p, abs=TOL)
        assert e["label"] == f"{domain}_{e['index']}"
    assert body["timing"]["total_ms"] >= body["timing"]["inference_ms"] >= 0


def test_path_multipart_and_json_forms_agree(client: httpx.Client) -> None:
    imgs = [encode(image(2)), encode(image(3), "JPEG"), encode(image(4), "WEBP")]
    raw = [
        client.post(
            "/v1/domains/birds/classify", content=data, headers={"Content-Type": t}, params={"top_k": 2}
        ).json()["results"][0]
        for data, t in zip(imgs, ["image/png", "image/jpeg", "image/webp"], strict=True)
    ]
    files = [("file", (f"{i}.img", data, "application/octet-stream")) for i, data in enumerate(imgs)]
    multi = client.post("/v1/classify", files=files, headers={"X-Domain": "birds"}, params={"top_k": 2})
    assert multi.status_code == 200, multi.text
    js = client.post(
        "/v1/classify",
        json={"images": [base64.b64encode(d).decode() for d in imgs], "top_k": 2},
        headers={"X-Domain": "birds"},
    )
    assert js.status_code == 200, js.text
    for body in (multi.json(), js.json()):
        assert len(body["results"]) == 3
        for got, want in zip(body["results"], raw, strict=True):
            assert len(got["top_k"]) == 2
            assert _probs(got) == pytest.approx(_probs(want), abs=TOL)


def test_top_k_is_capped_by_the_domain_class_count(client: httpx.Client) -> None:
    r = client.post(
        "/v1/domains/birds/classify",
        content=encode(image()),
        params={"top_k": 50},
        headers={"Content-Type": "image/png"},
    )
    assert r.status_code == 200
    probs = [e["probability"] for e in r.json()["results"][0]["top_k"]]
    assert len(probs) == 3 and sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert probs == sorted(probs, reverse=True)


def test_grayscale_and_palette_images_are_accepted(client: httpx.Client) -> None:
    for img in (image(5, mode="L"), image(6).convert("P"), image(7).convert("RGBA")):
        r = client.post(
            "/v1/classify", content=encode(img), headers={"X-Domain": "textures", "Content-Type": "image/png"}
        )
        assert r.status_code == 200, r.text


def test_domains_listing_and_residency(client: httpx.Client) -> None:
    listing = client.get("/v1/domains").json()["domains"]
    assert [d["domain"] for d in listing] == ["birds", "digits", "textures"]
    assert all(d["versions"] == [1] and d["active"] == 1 for d in listing)
    client.post(
        "/v1/classify", content=encode(image()), headers={"X-Domain": "digits", "Content-Type": "image/png"}
    )
    detail = client.get("/v1/domains/digits").json()
    assert detail["resident"] is True and detail["resident_versions"] == [1]
    assert detail["manifest"]["labels"] == ["digits_0", "digits_1", "digits_2", "digits_3"]
    assert detail["manifest"]["adapter"]["kind"] == "bn"
    assert client.get("/v1/domains/nope").status_code == 404


def _sample(text: str, line_start: str) -> float:
    """The value of the exposition line that starts with `line_start` (0 when absent)."""
    return next(
        (float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)), 0.0
    )


def test_health_ready_and_metrics(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["backbone"] == "resnet26"
    assert ready["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    ok_line = 'md_requests_total{domain="birds",route="/v1/classify",status="200"} '
    unknown_line = 'md_requests_total{domain="",route="/v1/classify",status="404"} '
    before = client.get("/metrics").text  # a server shared by a module has counted earlier tests
    for _ in range(2):
        client.post(
            "/v1/classify",
            content=encode(image()),
            headers={"X-Domain": "birds", "Content-Type": "image/png"},
        )
    client.post(
        "/v1/classify", content=encode(image()), headers={"X-Domain": "nope", "Content-Type": "image/png"}
    )
    text = client.get("/metrics").text
    assert _sample(text, ok_line) - _sample(before, ok_line) == 2.0
    # an unknown domain is counted without becoming a label of its own
    assert _sample(text, unknown_line) - _sample(before, unknown_line) == 1.0
    assert "md_bank_loads_total" in text and "md_batch_size_bucket" in text
    assert "md_resident_domains" in text and "md_device_memory_bytes" in text
    assert "md_queue_wait_seconds_count" in text
    assert 'md_domain_resident{domain="birds",engine="0",version="1"} 1.0' in text


def test_openapi_docs_are_served(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    assert "/v1/classify" in spec["paths"] and "/v1/domains/{domain}/adapters" in spec["paths"]
    assert client.get("/docs").status_code == 200
    responses = spec["paths"]["/v1/classify"]["post"]["responses"]
    for status in ("400", "404", "413", "415", "422", "429"):  # the JSON error body, not FastAPI's default
        assert responses[status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"
        }
    upload = spec["paths"]["/v1/domains/{domain}/adapters"]["post"]["responses"]
    assert {"201", "401", "403", "409", "413", "422"} <= set(upload)


def test_16_bit_png_uses_its_full_range(client: httpx.Client, world: TinyWorld) -> None:
    import numpy as np
    from PIL import Image

    values = np.random.default_rng(3).integers(0, 65536, (32, 40)).astype(np.uint16)
    r = client.post("/v1/classify", content=encode(Image.fromarray(values)),
                    headers={"X-Domain": "textures", "Content-Type": "image/png"})  # fmt: skip
    assert r.status_code == 200, r.text
    eight_bit = Image.fromarray((values >> 8).astype(np.uint8))  # not clipped at 255 (which is all white)
    ref = world.reference("textures", eight_bit)
    assert _probs(r.json()["results"][0]) == pytest.approx(
        dict(zip(ref.topk(5).indices.tolist(), ref.topk(5).values.tolist(), strict=True)), abs=TOL
    )
