"""Triton's own HTTP client (`tritonclient[http]`, KServe v2) against a real uvicorn serving the real
MobileNetV2 ImageNet weights: server and model metadata, readiness, and scikit-image's chelsea classified
"Egyptian cat" in JSON and in binary tensor data, as encoded bytes and as raw pixels."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import numpy as np
import pytest

from adapters_store import LocalStore
from server.app import create_app
from server.serving import ServerThread
from tests.server.conftest import chelsea_jpeg, settings_for

httpclient = pytest.importorskip("tritonclient.http")
EGYPTIAN_CAT = 285


@pytest.fixture(scope="module")
def triton(imagenet_store: LocalStore) -> Iterator[object]:
    with ServerThread(create_app(settings_for(imagenet_store))) as server:
        client = httpclient.InferenceServerClient(url=f"{server.host}:{server.port}", network_timeout=120)
        yield client
        client.close()


def test_metadata_and_readiness(triton: httpclient.InferenceServerClient) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.get_server_metadata()["name"] == "multidomain"
    meta = triton.get_model_metadata("imagenet")
    assert meta["inputs"][0] == {"name": "IMAGE", "datatype": "BYTES", "shape": [-1]}
    assert meta["outputs"][0] == {"name": "PROBABILITIES", "datatype": "FP32", "shape": [-1, 1000]}
    assert meta["parameters"]["labels"][EGYPTIAN_CAT] == "Egyptian cat"
    assert triton.get_model_metadata("imagenet", model_version="1")["parameters"]["version"] == 1
    assert triton.is_model_ready("imagenet") and triton.is_model_ready("imagenet", model_version="1")
    assert not triton.is_model_ready("imagenet", model_version="2")
    assert not triton.is_model_ready("no-such-domain")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_chelsea_is_an_egyptian_cat(triton: httpclient.InferenceServerClient, binary: bool) -> None:
    photo = chelsea_jpeg()
    image = httpclient.InferInput("IMAGE", [1], "BYTES")
    # JSON cannot carry raw bytes: in JSON the encoded image travels as base64.
    image.set_data_from_numpy(
        np.array([photo if binary else base64.b64encode(photo)], dtype=np.object_), binary_data=binary
    )
    outputs = [
        httpclient.InferRequestedOutput("PROBABILITIES", binary_data=binary),
        httpclient.InferRequestedOutput("LABELS", binary_data=binary),
    ]
    result = triton.infer("imagenet", [image], outputs=outputs, model_version="1")
    probs = result.as_numpy("PROBABILITIES")
    assert probs.shape == (1, 1000) and probs.dtype == np.float32
    assert int(probs[0].argmax()) == EGYPTIAN_CAT and 0.5 < probs[0].max() < 0.95
    assert probs[0].sum() == pytest.approx(1.0, abs=1e-4)
    labels = result.as_numpy("LABELS")
    assert labels.shape == (1, 5) and labels[0, 0] in (b"Egyptian cat", "Egyptian cat")
    assert result.get_response()["model_version"] == "1"

    classified = triton.infer(
        "imagenet", [image], outputs=[httpclient.InferRequestedOutput("PROBABILITIES", binary, class_count=3)]
    )
    top = classified.as_numpy("PROBABILITIES")
    assert top.shape == (1, 3)
    first = top[0, 0].decode() if isinstance(top[0, 0], bytes) else top[0, 0]
    score, index, label = first.split(":", 2)
    assert (index, label) == (str(EGYPTIAN_CAT), "Egyptian cat")
    assert float(score) == pytest.approx(float(probs[0].max()), abs=1e-5)


def test_raw_pixels_of_the_photo_size(triton: httpclient.InferenceServerClient) -> None:
    from skimage import data

    pixels = data.chelsea()[None]  # 1 x 300 x 451 x 3: resized and cropped by the domain's preprocessing
    tensor = httpclient.InferInput("PIXELS", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=True)
    result = triton.infer("imagenet", [tensor])  # no outputs named: all of them, in binary
    assert int(result.as_numpy("PROBABILITIES")[0].argmax()) == EGYPTIAN_CAT


def test_errors_reach_the_client_as_exceptions(triton: httpclient.InferenceServerClient) -> None:
    from tritonclient.utils import InferenceServerException

    bad = httpclient.InferInput("IMAGE", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_), binary_data=True)
    with pytest.raises(InferenceServerException) as refused:
        triton.infer("imagenet", [bad])
    assert "JPEG, PNG or WebP" in str(refused.value)
    assert refused.value.status() == "415"
