"""The Open Inference Protocol (KServe v2) routes on the tiny world, in-process and multi-process: metadata,
readiness, infer in JSON and binary with both inputs, Triton's classification strings, version-pinned
requests (v1 too), and errors in the protocol's `{"error": "..."}` form with /v1's statuses."""

from __future__ import annotations

import base64
import json
import struct

import httpx
import numpy as np
import pytest
from PIL import Image

from server.open_inference import classification_string
from tests.server.conftest import DOMAINS, TOL, TinyWorld, auth, encode, image


def _infer(client: httpx.Client, path: str, request: dict, binary: bytes = b"") -> httpx.Response:
    header = json.dumps(request).encode()
    headers = {"Content-Type": "application/octet-stream" if binary else "application/json"}
    if binary:
        headers["Inference-Header-Content-Length"] = str(len(header))
    return client.post(path, content=header + binary, headers=headers)


def _image_request(*images: bytes, **request: object) -> dict:
    data = [base64.b64encode(i).decode() for i in images]
    return {
        "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [len(images)], "data": data}],
        **request,
    }


def _outputs(body: dict) -> dict[str, dict]:
    return {o["name"]: o for o in body["outputs"]}


def _error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    return str(body["error"])


def test_server_health_and_metadata(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get("/v2").json()
    assert meta["name"] == "multidomain" and set(meta["extensions"]) == {
        "binary_tensor_data",
        "classification",
    }


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_model_metadata_lists_image_input_first_and_labels(client: httpx.Client, domain: str) -> None:
    r = client.get(f"/v2/models/{domain}")
    assert r.status_code == 200, r.text
    meta = r.json()
    classes = DOMAINS[domain][1]
    assert meta["name"] == domain and meta["versions"] == ["1"]
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        ("IMAGE", "BYTES", [-1]),
        ("PIXELS", "UINT8", [-1, -1, -1, 3]),
    ]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("PROBABILITIES", "FP32", [-1, classes]),
        ("LABELS", "BYTES", [-1, -1]),
    ]
    assert meta["parameters"]["labels"] == [f"{domain}_{i}" for i in range(classes)]
    assert meta["parameters"]["version"] == 1
    assert client.get(f"/v2/models/{domain}/ready").json() == {"name": domain, "version": "1", "ready": True}


def test_unknown_model_and_version_are_404_in_the_protocols_form(client: httpx.Client) -> None:
    assert "nope" in _error(client.get("/v2/models/nope"), 404)
    assert "nope" in _error(client.get("/v2/models/nope/ready"), 404)
    assert "version 7" in _error(client.get("/v2/models/birds/versions/7"), 404)
    _error(client.get("/v2/models/birds/versions/7/ready"), 404)
    _error(client.post("/v2/models/nope/infer", json=_image_request(encode(image(1)))), 404)
    _error(client.get("/v2/no/such/route"), 404)
    _error(client.get("/v2/models/birds/versions/zero"), 422)


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_json_infer_gives_the_reference_probabilities(
    client: httpx.Client, world: TinyWorld, domain: str
) -> None:
    imgs = [image(11), image(12, size=(50, 30))]
    r = _infer(client, f"/v2/models/{domain}/infer", _image_request(*map(encode, imgs), id="req-1"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model_name"], body["model_version"], body["id"]) == (domain, "1", "req-1")
    classes = DOMAINS[domain][1]
    out = _outputs(body)
    probs = out["PROBABILITIES"]
    assert (probs["datatype"], probs["shape"]) == ("FP32", [2, classes])
    got = np.asarray(probs["data"]).reshape(2, classes)
    for row, img in zip(got, imgs, strict=True):
        assert row == pytest.approx(world.reference(domain, img).tolist(), abs=TOL)
    k = min(5, classes)
    labels = out["LABELS"]
    assert (labels["datatype"], labels["shape"]) == ("BYTES", [2, k])
    for row, names in zip(got, np.asarray(labels["data"]).reshape(2, k), strict=True):
        assert set(names) == {f"{domain}_{i}" for i in np.argsort(-row)[:k]}


def test_pixels_of_any_size_are_cropped_like_decoded_images(client: httpx.Client) -> None:
    img = image(13, size=(61, 45))
    pixels = np.asarray(img)[None]
    decoded = _infer(client, "/v2/models/birds/infer", _image_request(encode(img)))
    as_json = {
        "inputs": [
            {"name": "PIXELS", "datatype": "UINT8", "shape": list(pixels.shape), "data": pixels.tolist()}
        ]
    }
    as_binary = {
        "inputs": [
            {
                "name": "PIXELS",
                "datatype": "UINT8",
                "shape": list(pixels.shape),
                "parameters": {"binary_data_size": pixels.nbytes},
            }
        ],
        "outputs": [{"name": "PROBABILITIES", "parameters": {"binary_data": False}}],
    }
    want = _outputs(decoded.json())["PROBABILITIES"]["data"]
    for r in (
        _infer(client, "/v2/models/birds/infer", as_json),
        _infer(client, "/v2/models/birds/infer", as_binary, pixels.tobytes()),
    ):
        assert r.status_code == 200, r.text
        assert _outputs(r.json())["PROBABILITIES"]["data"] == pytest.approx(want, abs=TOL)


def test_binary_request_and_response_with_classification(client: httpx.Client) -> None:
    imgs = [encode(image(14)), encode(image(15), "JPEG")]
    blob = b"".join(struct.pack("<I", len(i)) + i for i in imgs)
    request = {
        "inputs": [
            {
                "name": "IMAGE",
                "datatype": "BYTES",
                "shape": [2],
                "parameters": {"binary_data_size": len(blob)},
            }
        ],
        "outputs": [
            {"name": "PROBABILITIES", "parameters": {"binary_data": True}},
            {"name": "PROBABILITIES_TOP", "parameters": {}},
        ],
    }
    assert "PROBABILITIES_TOP" in _error(_infer(client, "/v2/models/textures/infer", request, blob), 400)
    request["outputs"] = [
        {"name": "PROBABILITIES", "parameters": {"binary_data": True}},
        {"name": "LABELS", "parameters": {"binary_data": True}},
    ]
    r = _infer(client, "/v2/models/textures/infer", request, blob)
    assert r.status_code == 200, r.text
    length = int(r.headers["Inference-Header-Content-Length"])
    header, data = json.loads(r.content[:length]), r.content[length:]
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert sizes[0] == 2 * 5 * 4 and sum(sizes) == len(data)
    probs = np.frombuffer(data[: sizes[0]], dtype="<f4").reshape(2, 5)
    assert probs.sum(axis=1) == pytest.approx([1, 1], abs=1e-5)

    classified = _infer(
        client,
        "/v2/models/textures/infer",
        {**request, "outputs": [{"name": "PROBABILITIES", "parameters": {"classification": 3}}]},
        blob,
    )
    assert classified.status_code == 200, classified.text
    [out] = classified.json()["outputs"]
    assert (out["datatype"], out["shape"]) == ("BYTES", [2, 3])
    rows = np.asarray(out["data"]).reshape(2, 3)
    for row, p in zip(rows, probs, strict=True):
        want = [classification_string(float(p[i]), int(i), f"textures_{i}") for i in np.argsort(-p)[:3]]
        scores = [float(s.split(":")[0]) for s in row]
        assert scores == pytest.approx([float(w.split(":")[0]) for w in want], abs=TOL)
        assert [s.split(":", 1)[1] for s in row] == [w.split(":", 1)[1] for w in want]
        assert all(len(s.split(":")[0].split(".")[1]) == 6 for s in row)  # "%f", as Triton prints it


def test_classification_string_is_tritons_format() -> None:
    assert classification_string(0.72201514, 285, "Egyptian cat") == "0.722015:285:Egyptian cat"
    assert classification_string(1e-9, 3, "x") == "0.000000:3:x"


@pytest.mark.parametrize(
    ("request_body", "binary", "status", "says"),
    [
        ({"inputs": []}, b"", 400, "inputs"),
        (
            {"inputs": [{"name": "X", "datatype": "BYTES", "shape": [1], "data": ["aa=="]}]},
            b"",
            400,
            "unknown input",
        ),
        ({"inputs": [{"name": "IMAGE", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, b"", 400, "BYTES"),
        (
            {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [2], "data": ["aa=="]}]},
            b"",
            400,
            "elements",
        ),
        (
            {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["%%"]}]},
            b"",
            400,
            "base64",
        ),
        (
            {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["aGVsbG8="]}]},
            b"",
            415,
            "JPEG",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "IMAGE",
                        "datatype": "BYTES",
                        "shape": [1],
                        "parameters": {"binary_data_size": 9},
                    }
                ]
            },
            b"\x09\x00\x00\x00abc",
            400,
            "binary_data_size",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "IMAGE",
                        "datatype": "BYTES",
                        "shape": [1],
                        "parameters": {"binary_data_size": 7},
                    }
                ]
            },
            b"\x09\x00\x00\x00abc",
            400,
            "runs past",
        ),
        (
            {"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [1, 4, 4], "data": [0] * 16}]},
            b"",
            400,
            "[N, H, W, 3]",
        ),
        (
            {"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": [300] * 12}]},
            b"",
            400,
            "0 to 255",
        ),
        (
            {"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [1, 9000, 9000, 3], "data": []}]},
            b"",
            413,
            "pixels",
        ),
        (
            {"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [100, 2, 2, 3], "data": []}]},
            b"",
            400,
            "limit",
        ),
        ({**_image_request(b"x"), "parameters": {"top_k": 1000}}, b"", 400, "top_k"),
        (
            {**_image_request(b"x"), "outputs": [{"name": "LABELS", "parameters": {"classification": 2}}]},
            b"",
            400,
            "classification",
        ),
    ],
)
def test_bad_infer_requests_are_refused_with_the_reason(
    client: httpx.Client, request_body: dict, binary: bytes, status: int, says: str
) -> None:
    assert says in _error(_infer(client, "/v2/models/birds/infer", request_body, binary), status)


def test_bad_framing_and_oversized_bodies(client: httpx.Client) -> None:
    headers = {"Inference-Header-Content-Length": "999"}
    assert "outside" in _error(client.post("/v2/models/birds/infer", content=b"{}", headers=headers), 400)
    assert "JSON" in _error(client.post("/v2/models/birds/infer", content=b"not json"), 400)
    huge = b"0" * (17 * 1024 * 1024)
    assert "limit" in _error(client.post("/v2/models/birds/infer", content=huge), 413)


def test_version_pinned_requests_v1_and_v2(client: httpx.Client, world: TinyWorld) -> None:
    v2 = world.artifacts["birds_v2"]
    r = client.post(
        "/v1/domains/birds/adapters",
        files={"manifest": ("manifest.json", v2.manifest), "tensors": ("adapter.safetensors", v2.tensors)},
        params={"activate": "true"},
        headers=auth(),
    )
    assert r.status_code == 201 and r.json()["version"] == 2, r.text
    img = image(16)
    for version, reference in ((1, "birds"), (2, "birds_v2")):
        want = world.reference(reference, img).tolist()
        pinned = client.post(
            f"/v1/domains/birds/versions/{version}/classify",
            content=encode(img),
            headers={"Content-Type": "image/png"},
        )
        assert pinned.status_code == 200 and pinned.json()["version"] == version, pinned.text
        got = {e["index"]: e["probability"] for e in pinned.json()["results"][0]["top_k"]}
        assert got == pytest.approx({i: want[i] for i in got}, abs=TOL)
        r = _infer(client, f"/v2/models/birds/versions/{version}/infer", _image_request(encode(img)))
        assert r.status_code == 200 and r.json()["model_version"] == str(version), r.text
        assert _outputs(r.json())["PROBABILITIES"]["data"] == pytest.approx(want, abs=TOL)
        assert client.get(f"/v2/models/birds/versions/{version}").json()["parameters"]["version"] == version
    assert client.get("/v2/models/birds").json()["versions"] == ["1", "2"]
    assert (
        _infer(client, "/v2/models/birds/infer", _image_request(encode(img))).json()["model_version"] == "2"
    )

    assert client.delete("/v1/domains/birds/versions/1", headers=auth()).status_code == 200
    gone = client.post(
        "/v1/domains/birds/versions/1/classify", content=encode(img), headers={"Content-Type": "image/png"}
    )
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "version_not_found", gone.text
    assert "version 1" in _error(
        _infer(client, "/v2/models/birds/versions/1/infer", _image_request(encode(img))), 404
    )
    _error(client.get("/v2/models/birds/versions/1/ready"), 404)


def test_grayscale_domain_takes_rgb_pixels(client: httpx.Client, world: TinyWorld) -> None:
    img = image(17, size=(30, 30))
    pixels = np.asarray(img)[None]
    request = {
        "inputs": [
            {"name": "PIXELS", "datatype": "UINT8", "shape": list(pixels.shape), "data": pixels.tolist()}
        ]
    }
    r = _infer(client, "/v2/models/textures/infer", request)
    assert r.status_code == 200, r.text
    want = world.reference("textures", Image.fromarray(pixels[0])).tolist()
    assert _outputs(r.json())["PROBABILITIES"]["data"] == pytest.approx(want, abs=TOL)
