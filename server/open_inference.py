"""The Open Inference Protocol's (KServe v2) tensors: parse an infer request, encode an infer response.

No HTTP and no engine here (the routes are `server.routes.open_inference`): the request body (JSON, or
JSON followed by binary tensor data when `Inference-Header-Content-Length` names the JSON's length, the
binary-data extension) becomes the images of one request; the engine's per-image ranking becomes
outputs in JSON or binary form.

Every domain is one model with
- inputs `IMAGE` (BYTES [N]: encoded JPEG/PNG/WebP files, as Triton's image clients send them; raw bytes
  in binary form, base64 strings in JSON, since JSON strings cannot hold arbitrary bytes) or `PIXELS`
  (UINT8 [N, H, W, 3], any H and W: resized and cropped by the domain's preprocessing);
- outputs `PROBABILITIES` (FP32 [N, K], K the domain's classes) and `LABELS` (BYTES [N, k], the top-k
  labels, k from the request's `top_k` parameter, default 5). The classification extension
  (`"parameters": {"classification": c}` on an output) turns an output into BYTES [N, c] strings
  `"score:index:label"`, the score printed as C++'s `std::to_string(float)` does (`%f`), as Triton does.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from domain_format.preprocess import TooManyPixels
from server.errors import BadRequest

IMAGE_INPUT = "IMAGE"
PIXELS_INPUT = "PIXELS"
PROBABILITIES_OUTPUT = "PROBABILITIES"
LABELS_OUTPUT = "LABELS"
DEFAULT_TOP_K = 5
HEADER_LENGTH = "inference-header-content-length"


class _Tensor(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = None


class _RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class _InferRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[_Tensor] = Field(min_length=1)
    outputs: list[_RequestedOutput] | None = None


@dataclass
class OutputRequest:
    name: str
    binary: bool
    classification: int | None
    """Classes to report as "score:index:label" strings, None: the plain tensor."""


@dataclass
class InferRequest:
    """One infer request, checked: its images (encoded bytes) or pixel arrays, and what to answer."""

    id: str | None
    encoded: list[bytes] | None
    pixels: np.ndarray | None
    """uint8 [N, H, W, 3] when the input is PIXELS."""
    outputs: list[OutputRequest]
    top_k: int
    """Labels per image in the LABELS output."""
    images: int = field(init=False)

    def __post_init__(self) -> None:
        self.images = len(self.encoded) if self.encoded is not None else len(self.pixels)  # type: ignore[arg-type]

    def ranks_needed(self, classes: int) -> int:
        """How many ranked classes per image the engine must return for the requested outputs."""
        needed = 0
        for out in self.outputs:
            if out.classification is not None:
                needed = max(needed, out.classification)
            elif out.name == PROBABILITIES_OUTPUT:
                needed = classes  # the whole vector
            else:
                needed = max(needed, self.top_k)
        return min(max(1, needed), classes)


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"{what} must be a positive integer (got {value!r})")
    return value


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        raise BadRequest(f"Inference-Header-Content-Length {header_length!r} is not an integer") from None
    if not 0 < length <= len(body):
        raise BadRequest(f"Inference-Header-Content-Length {length} is outside the body's {len(body)} bytes")
    return body[:length], body[length:]


def _bytes_elements(raw: bytes) -> list[bytes]:
    """BYTES tensor data in binary form: each element a 4-byte little-endian length, then its bytes."""
    out, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise BadRequest("the IMAGE binary data ends inside an element's 4-byte length")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise BadRequest(f"an IMAGE element of {size} bytes runs past the end of its binary data")
        out.append(raw[offset : offset + size])
        offset += size
    return out


def _batch_of(shape: list[int], max_images: int) -> int:
    if not shape or any(d < 0 for d in shape):
        raise BadRequest(f"the input shape {shape} is not a tensor shape")
    if shape[0] < 1:
        raise BadRequest("the input holds no image")
    if shape[0] > max_images:
        raise BadRequest(f"{shape[0]} images exceed the limit of {max_images} per request")
    return shape[0]


def _image_input(tensor: _Tensor, raw: bytes | None, max_images: int) -> list[bytes]:
    if tensor.datatype != "BYTES":
        raise BadRequest(f"input {IMAGE_INPUT} has datatype BYTES, not {tensor.datatype}")
    count = _batch_of(tensor.shape, max_images)
    if math.prod(tensor.shape) != count:
        raise BadRequest(f"input {IMAGE_INPUT} has shape [N] (or [N, 1]), not {tensor.shape}")
    if raw is not None:
        images = _bytes_elements(raw)
    else:
        if tensor.data is None:
            raise BadRequest(f"input {IMAGE_INPUT} has neither data nor binary_data_size")
        if not all(isinstance(s, str) for s in tensor.data):
            raise BadRequest(f"input {IMAGE_INPUT} in JSON is a list of base64 strings")
        try:
            images = [base64.b64decode(s, validate=True) for s in tensor.data]
        except (binascii.Error, ValueError):
            raise BadRequest(f"an element of input {IMAGE_INPUT} is not valid base64") from None
    if len(images) != count:
        raise BadRequest(f"input {IMAGE_INPUT} has shape {tensor.shape} but {len(images)} elements")
    return images


def _pixels_input(tensor: _Tensor, raw: bytes | None, max_images: int, max_pixels: int) -> np.ndarray:
    if tensor.datatype != "UINT8":
        raise BadRequest(f"input {PIXELS_INPUT} has datatype UINT8, not {tensor.datatype}")
    _batch_of(tensor.shape, max_images)
    if len(tensor.shape) != 4 or tensor.shape[3] != 3 or tensor.shape[1] < 1 or tensor.shape[2] < 1:
        raise BadRequest(f"input {PIXELS_INPUT} has shape [N, H, W, 3], not {tensor.shape}")
    height, width = tensor.shape[1], tensor.shape[2]
    if height * width > max_pixels:
        raise TooManyPixels(
            f"an image of {width}x{height} = {height * width} pixels exceeds the limit of {max_pixels}",
            max_pixels=max_pixels,
        )
    elements = math.prod(tensor.shape)
    if raw is not None:
        if len(raw) != elements:
            raise BadRequest(
                f"input {PIXELS_INPUT} of shape {tensor.shape} needs {elements} bytes, got {len(raw)}"
            )
        return np.frombuffer(raw, dtype=np.uint8).reshape(tensor.shape)
    if tensor.data is None:
        raise BadRequest(f"input {PIXELS_INPUT} has neither data nor binary_data_size")
    try:
        values = np.asarray(tensor.data, dtype=np.int64).reshape(-1)
    except (ValueError, TypeError, OverflowError):
        raise BadRequest(f"input {PIXELS_INPUT} in JSON is a (flat or nested) list of integers") from None
    if values.size != elements:
        raise BadRequest(f"input {PIXELS_INPUT} has shape {tensor.shape} but {values.size} values")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise BadRequest(f"input {PIXELS_INPUT} values are UINT8: 0 to 255")
    return values.astype(np.uint8).reshape(tensor.shape)


def _outputs(request: _InferRequest, max_top_k: int) -> list[OutputRequest]:
    binary_default = bool(request.parameters.get("binary_data_output", False))
    if request.outputs is None:
        names = [PROBABILITIES_OUTPUT, LABELS_OUTPUT]
        return [OutputRequest(n, binary_default, None) for n in names]
    out = []
    for requested in request.outputs:
        if requested.name not in (PROBABILITIES_OUTPUT, LABELS_OUTPUT):
            raise BadRequest(
                f"unknown output {requested.name!r}: the outputs are {PROBABILITIES_OUTPUT} and {LABELS_OUTPUT}"
            )
        params = requested.parameters
        classification = params.get("classification")
        if classification is not None:
            classification = _positive_int(classification, "the classification parameter")
            if requested.name != PROBABILITIES_OUTPUT:
                raise BadRequest(f"classification applies to {PROBABILITIES_OUTPUT}, not {requested.name}")
            if classification > max_top_k:
                raise BadRequest(f"classification {classification} exceeds the limit of {max_top_k}")
        out.append(
            OutputRequest(requested.name, bool(params.get("binary_data", binary_default)), classification)
        )
    if len({o.name for o in out}) != len(out):
        raise BadRequest("an output is requested twice")
    return out


def parse_infer_request(
    body: bytes,
    header_length: str | None,
    *,
    max_images: int,
    max_pixels: int,
    max_top_k: int,
) -> InferRequest:
    """The request's images and outputs; BadRequest naming what is wrong."""
    header, binary = _split_body(body, header_length)
    try:
        request = _InferRequest.model_validate_json(header)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise BadRequest(f"the infer request is not the protocol's JSON: {problems}") from None
    if len(request.inputs) != 1:
        raise BadRequest(
            f"one input per request ({IMAGE_INPUT} or {PIXELS_INPUT}), got {len(request.inputs)}"
        )
    [tensor] = request.inputs
    raw: bytes | None = None
    size = tensor.parameters.get("binary_data_size")
    if size is not None:
        size = _positive_int(size, "binary_data_size")
        if size != len(binary):
            raise BadRequest(
                f"binary_data_size {size} but {len(binary)} bytes of binary data follow the JSON"
            )
        raw = binary
    elif binary:
        raise BadRequest(f"{len(binary)} bytes follow the JSON but no input names a binary_data_size")
    top_k = _positive_int(request.parameters.get("top_k", DEFAULT_TOP_K), "the top_k parameter")
    if top_k > max_top_k:
        raise BadRequest(f"top_k {top_k} exceeds the limit of {max_top_k}")
    outputs = _outputs(request, max_top_k)
    if tensor.name == IMAGE_INPUT:
        return InferRequest(request.id, _image_input(tensor, raw, max_images), None, outputs, top_k)
    if tensor.name == PIXELS_INPUT:
        pixels = _pixels_input(tensor, raw, max_images, max_pixels)
        return InferRequest(request.id, None, pixels, outputs, top_k)
    raise BadRequest(f"unknown input {tensor.name!r}: the inputs are {IMAGE_INPUT} and {PIXELS_INPUT}")


def classification_string(probability: float, index: int, label: str) -> str:
    """Triton's classification entry: std::to_string(float) prints "%f"."""
    return f"{probability:f}:{index}:{label}"


def _serialise_bytes(values: list[str]) -> bytes:
    encoded = [v.encode() for v in values]
    return b"".join(struct.pack("<I", len(e)) + e for e in encoded)


def encode_infer_response(
    request: InferRequest,
    model_name: str,
    version: int,
    classes: int,
    results: list[list[Any]],
    parameters: dict[str, Any],
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    n = len(results)
    for out in request.outputs:
        if out.classification is not None:
            c = min(out.classification, classes)
            strings = [classification_string(p, i, label) for r in results for i, label, p in r[:c]]
            tensor: dict[str, Any] = {"name": out.name, "datatype": "BYTES", "shape": [n, c]}
            data: Any = strings
            blob = _serialise_bytes(strings) if out.binary else b""
        elif out.name == PROBABILITIES_OUTPUT:
            dense = np.zeros((n, classes), dtype="<f4")
            for row, ranked in enumerate(results):
                for i, _label, p in ranked:
                    dense[row, i] = p
            tensor = {"name": out.name, "datatype": "FP32", "shape": [n, classes]}
            data = dense.reshape(-1).tolist()
            blob = dense.tobytes() if out.binary else b""
        else:
            k = min(request.top_k, classes)
            labels = [label for r in results for _i, label, _p in r[:k]]
            tensor = {"name": out.name, "datatype": "BYTES", "shape": [n, k]}
            data = labels
            blob = _serialise_bytes(labels) if out.binary else b""
        if out.binary:
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = data
        outputs.append(tensor)
    response: dict[str, Any] = {"model_name": model_name, "model_version": str(version), "outputs": outputs}
    if request.id is not None:
        response["id"] = request.id
    response["parameters"] = parameters
    header = json.dumps(response).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
