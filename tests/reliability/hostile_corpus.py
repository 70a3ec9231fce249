"""The hostile corpus: malformed and malicious adapter uploads and images, with the answer each must get.

Generated, never committed: `write_corpus(dir, valid, marker)` writes every case's bytes and an
`index.json` of expectations into `dir`; `load_corpus(dir)` reads them back (what the tests do). Run as a
script to inspect the corpus by hand::

    python -m tests.reliability.hostile_corpus OUT_DIR      # uses a fabricated valid artifact

Every pickle in here carries a payload that creates `marker` when unpickled (`exec` of an `open`), so a
test can prove that no byte of an upload ever reached pickle: the marker file must never appear.

An upload case is a raw body or a multipart form aimed at `/v1/domains/{path_domain}/adapters`; an image
case is a body for the classify endpoint. `expect` is the exact status; `code` the error code (None: the
request must succeed and, for images, answer exactly like the model library does on the decoded pixels).
"""

from __future__ import annotations

import base64
import io
import json
import math
import pickle
import struct
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from PIL import Image, PngImagePlugin

from adapters_store.bundle import pack_bundle
from adapters_store.validation import sha256_hex


class MarkerPayload:
    """Unpickling this object runs `exec`, which creates the marker file: proof that pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (exec, (f"open({self.marker!r}, 'w').close()",))


@dataclass(frozen=True)
class Part:
    """One multipart field: a file part (filename set) or a text field (filename None)."""

    field: str
    data: bytes
    filename: str | None = None
    content_type: str = "application/octet-stream"


@dataclass(frozen=True)
class UploadCase:
    name: str
    expect: int
    code: str | None
    body: bytes | None = None
    content_type: str | None = None
    parts: tuple[Part, ...] = ()
    path_domain: str = "birds"
    auth: bool = True
    message_has: str | None = None
    """A word the error's message or problems must contain (the answer names what is wrong)."""


@dataclass(frozen=True)
class ImageCase:
    name: str
    expect: int
    code: str | None
    body: bytes = b""
    content_type: str = "image/png"
    multipart: tuple[Part, ...] = ()
    json_body: bool = False
    reference: str | None = None
    """For a 200: how the expected pixels are obtained ("decoded": PIL's decode of the body as the
    server does it; "16bit": that decode scaled from 16 to 8 bits)."""


@dataclass(frozen=True)
class ValidArtifact:
    """A valid upload for the served backbone: manifest as a dict, tensors as numpy arrays."""

    manifest: dict[str, Any]
    tensors: dict[str, np.ndarray]

    def manifest_bytes(self, **changes: Any) -> bytes:
        return json.dumps({**self.manifest, **changes}).encode()

    def tensor_bytes(self) -> bytes:
        return safetensors.numpy.save(self.tensors)


# -- building blocks ------------------------------------------------------------------------------


def _pickles(marker: Path, protocol: int = 2) -> bytes:
    return pickle.dumps(MarkerPayload(marker), protocol=protocol)


def _torch_zip(marker: Path) -> bytes:
    """The layout `torch.save` writes (a zip with archive/data.pkl): what `torch.load` would unpickle."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("archive/data.pkl", _pickles(marker))
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return out.getvalue()


def _npy_object(marker: Path) -> bytes:
    out = io.BytesIO()
    np.save(out, np.array([MarkerPayload(marker)], dtype=object), allow_pickle=True)
    return out.getvalue()


def _npz_object(marker: Path) -> bytes:
    out = io.BytesIO()
    np.savez(out, weights=np.array([MarkerPayload(marker)], dtype=object))
    return out.getvalue()


def _tar(members: list[tuple[str, bytes]], kind: bytes = tarfile.REGTYPE, mode: str = "w") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as tar:  # type: ignore[call-overload]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            info.type = kind
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = "/etc/passwd"
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return out.getvalue()


def _safetensors_raw(header: bytes | dict[str, Any], data: bytes, length: int | None = None) -> bytes:
    """A safetensors file from a hand-written header (8-byte little-endian length, JSON, data)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _header_of(tensors: dict[str, np.ndarray]) -> tuple[dict[str, Any], bytes]:
    """A correct header and data buffer for `tensors` (float32), to be broken one way."""
    header: dict[str, Any] = {}
    chunks = []
    offset = 0
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array).tobytes()
        dtype = {"float32": "F32", "int64": "I64"}[str(array.dtype)]
        header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    return header, b"".join(chunks)


def _first_float(tensors: dict[str, np.ndarray]) -> str:
    return next(n for n, a in tensors.items() if a.dtype == np.float32 and a.size > 1)


def _multipart_parts(
    manifest: bytes, tensors: bytes, filename: str = "adapter.safetensors"
) -> tuple[Part, ...]:
    return (
        Part("manifest", manifest, "manifest.json", "application/json"),
        Part("tensors", tensors, filename),
    )


# -- uploads --------------------------------------------------------------------------------------


def upload_cases(valid: ValidArtifact, marker: Path) -> list[UploadCase]:
    """At least 50 refused uploads, each with its exact status and error code."""
    cases: list[UploadCase] = []
    good_manifest = valid.manifest_bytes()
    good_tensors = valid.tensor_bytes()

    def refused_tensors(name: str, tensors: bytes, filename: str = "adapter.safetensors", **kw: Any) -> None:
        # The manifest names the checksum of the hostile bytes, so only the tensor file itself is wrong.
        manifest = valid.manifest_bytes(sha256=sha256_hex(tensors))
        cases.append(
            UploadCase(
                name, 422, "invalid_artifact", parts=_multipart_parts(manifest, tensors, filename), **kw
            )
        )

    def refused_manifest(name: str, manifest: bytes, **kw: Any) -> None:
        cases.append(
            UploadCase(name, 422, "invalid_artifact", parts=_multipart_parts(manifest, good_tensors), **kw)
        )

    # Pickles: every protocol, every extension, inside zip (torch.save) and npy/npz containers.
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        refused_tensors(f"pickle_protocol_{protocol}", _pickles(marker, protocol))
    for ext in ("pt", "pth", "bin", "ckpt", "pkl", "pickle", "joblib", "npy", "h5"):
        refused_tensors(f"pickle_as_{ext}", _pickles(marker), f"adapter.{ext}")
    refused_tensors("torch_zip_as_pt", _torch_zip(marker), "adapter.pt")
    refused_tensors("torch_zip_as_safetensors", _torch_zip(marker))
    refused_tensors("npy_object_array", _npy_object(marker), "adapter.npy")
    refused_tensors("npz_object_array", _npz_object(marker), "adapter.npz")
    refused_manifest("pickle_as_manifest", _pickles(marker))
    tar = "application/x-tar"
    cases += [
        UploadCase("raw_pickle_as_tar", 422, "invalid_artifact", body=_pickles(marker), content_type=tar),
        UploadCase(
            "raw_torch_zip_as_tar", 422, "invalid_artifact", body=_torch_zip(marker), content_type=tar
        ),
        UploadCase(
            "raw_torch_zip_octet_stream",
            422,
            "invalid_artifact",
            body=_torch_zip(marker),
            content_type="application/octet-stream",
        ),
        UploadCase(
            "raw_pickle_python_pickle_type",
            415,
            "unsupported_media_type",
            body=_pickles(marker),
            content_type="application/python-pickle",
        ),
        UploadCase(
            "bundle_with_pickled_tensors",
            422,
            "invalid_artifact",
            body=pack_bundle(valid.manifest_bytes(sha256=sha256_hex(_pickles(marker))), _pickles(marker)),
            content_type=tar,
        ),
        UploadCase(
            "bundle_with_extra_pickle_member",
            422,
            "invalid_artifact",
            body=_tar(
                [
                    ("manifest.json", good_manifest),
                    ("adapter.safetensors", good_tensors),
                    ("data.pkl", _pickles(marker)),
                ]
            ),
            content_type=tar,
        ),
        UploadCase(
            "bundle_part_is_torch_zip",
            422,
            "invalid_artifact",
            parts=(Part("bundle", _torch_zip(marker), "adapter.tar"),),
        ),
        UploadCase(
            "bundle_gzip_compressed",
            422,
            "invalid_artifact",
            body=_tar([("manifest.json", good_manifest), ("adapter.safetensors", good_tensors)], mode="w:gz"),
            content_type=tar,
        ),
        UploadCase(
            "bundle_path_traversal_members",
            422,
            "invalid_artifact",
            body=_tar([("../manifest.json", good_manifest), ("../../adapter.safetensors", good_tensors)]),
            content_type=tar,
        ),
        UploadCase(
            "bundle_symlink_members",
            422,
            "invalid_artifact",
            body=_tar([("manifest.json", b""), ("adapter.safetensors", b"")], kind=tarfile.SYMTYPE),
            content_type=tar,
        ),
        UploadCase(
            "bundle_duplicate_members",
            422,
            "invalid_artifact",
            body=_tar([("manifest.json", good_manifest), ("manifest.json", good_manifest)]),
            content_type=tar,
        ),
        UploadCase(
            "bundle_truncated",
            422,
            "invalid_artifact",
            body=pack_bundle(good_manifest, good_tensors)[:700],
            content_type=tar,
        ),
    ]

    # safetensors headers and data.
    header, data = _header_of(valid.tensors)
    some = _first_float(valid.tensors)

    def broken(**entry: Any) -> dict[str, Any]:
        return {**header, some: {**header[some], **entry}}

    begin, end = header[some]["data_offsets"]
    refused_tensors("st_header_length_huge", _safetensors_raw(header, data, length=2**63 - 1))
    refused_tensors(
        "st_header_length_past_end", _safetensors_raw(header, data, length=len(data) * 4 + 10_000)
    )
    refused_tensors("st_header_length_zero", _safetensors_raw(b"", data, length=0))
    refused_tensors("st_shorter_than_prefix", b"\x07\x00\x00")
    refused_tensors("st_header_not_json", _safetensors_raw(b"{not json" + b" " * 7, data))
    refused_tensors("st_header_json_array", _safetensors_raw(b"[1, 2, 3]", data))
    refused_tensors(
        "st_offsets_past_end", _safetensors_raw(broken(data_offsets=[begin, len(data) + 4096]), data)
    )
    first, second = list(header)[:2]
    overlap = {**header, second: {**header[second], "data_offsets": header[first]["data_offsets"]}}
    refused_tensors("st_offsets_overlap", _safetensors_raw(overlap, data))
    refused_tensors("st_offsets_reversed", _safetensors_raw(broken(data_offsets=[end, begin]), data))
    refused_tensors("st_buffer_gap", _safetensors_raw(header, data + b"\0" * 64))
    refused_tensors("st_offsets_size_mismatch", _safetensors_raw(broken(data_offsets=[begin, end - 4]), data))
    refused_tensors("st_shape_claims_huge", _safetensors_raw(broken(shape=[2**20, 2**20, 2**10]), data))
    refused_tensors("st_negative_dim", _safetensors_raw(broken(shape=[-1, 4]), data))
    refused_tensors("st_unknown_dtype", _safetensors_raw(broken(dtype="X99"), data))
    as64 = {n: a.astype(np.float64) if a.dtype == np.float32 else a for n, a in valid.tensors.items()}
    refused_tensors("st_float64_for_float32", safetensors.numpy.save(as64))
    as16 = {n: a.astype(np.float16) if a.dtype == np.float32 else a for n, a in valid.tensors.items()}
    refused_tensors("st_float16_for_float32", safetensors.numpy.save(as16))
    refused_tensors(
        "st_int32_tensor",
        safetensors.numpy.save({**valid.tensors, some: valid.tensors[some].astype(np.int32)}),
    )
    for label, value in (("nan", math.nan), ("inf", math.inf), ("neg_inf", -math.inf)):
        poisoned = valid.tensors[some].copy()
        poisoned.flat[0] = value
        refused_tensors(f"st_{label}_value", safetensors.numpy.save({**valid.tensors, some: poisoned}))
    head = next(n for n in valid.tensors if n.endswith("weight") and n.startswith("head"))
    rows, cols = valid.tensors[head].shape
    refused_tensors(
        "st_head_one_row_too_many",
        safetensors.numpy.save({**valid.tensors, head: np.zeros((rows + 1, cols), np.float32)}),
    )
    refused_tensors(
        "st_head_one_column_short",
        safetensors.numpy.save({**valid.tensors, head: np.zeros((rows, cols - 1), np.float32)}),
    )
    refused_tensors(
        "st_head_transposed",
        safetensors.numpy.save({**valid.tensors, head: np.zeros((cols, rows), np.float32)}),
    )
    refused_tensors(
        "st_missing_tensor", safetensors.numpy.save({n: a for n, a in valid.tensors.items() if n != some})
    )
    refused_tensors(
        "st_extra_tensor", safetensors.numpy.save({**valid.tensors, "evil.extra": np.zeros(3, np.float32)})
    )
    refused_tensors(
        "st_traversal_tensor_name",
        safetensors.numpy.save({**valid.tensors, "../../etc/passwd": np.zeros(3, np.float32)}),
    )
    # Duplicated keys in the safetensors header: the second entry must not silently win.
    dup = json.dumps(header)[:-1] + f', "{some}": ' + json.dumps(header[some]) + "}"
    refused_tensors("st_header_duplicate_key", _safetensors_raw(dup.encode(), data))
    refused_tensors(
        "st_metadata_not_strings", _safetensors_raw({**header, "__metadata__": {"a": {"b": 1}}}, data)
    )
    many = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(12_000)}
    refused_tensors("st_twelve_thousand_entries", _safetensors_raw(many, b""))
    refused_tensors("st_empty_file", b"")
    refused_tensors("st_truncated_half", good_tensors[: len(good_tensors) // 2])
    cases.append(
        UploadCase(
            "checksum_mismatch",
            422,
            "invalid_artifact",
            parts=_multipart_parts(valid.manifest_bytes(sha256="0" * 64), good_tensors),
            message_has="sha256",
        )
    )

    # Manifests.
    refused_manifest(
        "other_backbone_fingerprint",
        valid.manifest_bytes(backbone_fingerprint="ab" * 32),
        message_has="fingerprint",
    )
    refused_manifest(
        "labels_huge_list", valid.manifest_bytes(labels=[f"label_{i:07d}" for i in range(150_000)])
    )
    refused_manifest("labels_one_too_many", valid.manifest_bytes(labels=[*valid.manifest["labels"], "extra"]))
    refused_manifest("labels_duplicated", valid.manifest_bytes(labels=["x"] * len(valid.manifest["labels"])))
    refused_manifest(
        "label_ten_thousand_chars", valid.manifest_bytes(labels=["L" * 10_000, *valid.manifest["labels"][1:]])
    )
    refused_manifest("domain_path_traversal", valid.manifest_bytes(domain="../../etc"))
    refused_manifest("domain_absolute_path", valid.manifest_bytes(domain="/etc/passwd"))
    refused_manifest("domain_nul_byte", valid.manifest_bytes(domain="birds\x00.x"))
    refused_manifest("domain_for_another_path", valid.manifest_bytes(domain="digits"), message_has="birds")
    uni = "bïrds"
    cases.append(
        UploadCase(
            "domain_unicode",
            422,
            "invalid_artifact",
            parts=_multipart_parts(valid.manifest_bytes(domain=uni), good_tensors),
            path_domain=uni,
        )
    )
    cases.append(
        UploadCase(
            "domain_rtl_override",
            422,
            "invalid_artifact",
            parts=_multipart_parts(valid.manifest_bytes(domain="bi\u202erds"), good_tensors),
            path_domain="bi\u202erds",
        )
    )
    cases.append(
        UploadCase(
            "url_domain_traversal",  # ".." is a dot segment: normalised away, so no route matches
            404,
            "not_found",
            parts=_multipart_parts(valid.manifest_bytes(domain=".."), good_tensors),
            path_domain="..",
        )
    )
    text = good_manifest.decode()
    refused_manifest("manifest_duplicate_key", (text[:-1] + ', "domain": "digits"}').encode())
    refused_manifest("manifest_not_json", b"domain: birds\nlabels: [a]\n")
    refused_manifest("manifest_empty", b"")
    refused_manifest("manifest_truncated", good_manifest[: len(good_manifest) // 2])
    refused_manifest("manifest_nesting_bomb", b"[" * 200_000 + b"]" * 200_000)
    refused_manifest(
        "manifest_huge_integer", text.replace('"epochs": 1', '"epochs": 1' + "0" * 5000).encode()
    )
    refused_manifest(
        "manifest_nan_literal", text.replace('"val_accuracy": 0.5', '"val_accuracy": NaN').encode()
    )
    refused_manifest("manifest_top_level_array", b"[" + good_manifest + b"]")
    refused_manifest("manifest_utf16", good_manifest.decode().encode("utf-16"))
    refused_manifest("manifest_unknown_field", valid.manifest_bytes(evil=True))
    refused_manifest(
        "manifest_missing_labels",
        json.dumps({k: v for k, v in valid.manifest.items() if k != "labels"}).encode(),
    )
    prov = valid.manifest["provenance"]
    refused_manifest(
        "manifest_accuracy_above_one", valid.manifest_bytes(provenance={**prov, "val_accuracy": 7})
    )
    refused_manifest(
        "manifest_naive_datetime",
        valid.manifest_bytes(provenance={**prov, "created_at": "2024-01-01T00:00:00"}),
    )
    pre = valid.manifest["preprocessing"]
    refused_manifest(
        "manifest_zero_std", valid.manifest_bytes(preprocessing={**pre, "std": [0.0, 0.25, 0.25]})
    )
    refused_manifest(
        "manifest_input_size_huge", valid.manifest_bytes(preprocessing={**pre, "input_size": 10**9})
    )
    refused_manifest(
        "manifest_adapter_kind_unknown",
        valid.manifest_bytes(adapter={**valid.manifest["adapter"], "kind": "os.system"}),
    )

    # Finite values no trained network has, and layouts the server could store but never serve.
    huge_head = valid.tensors[head].copy()
    huge_head[0, :] = 3e38  # finite in float32: was stored, then classify answered 200 with null
    refused_tensors("st_head_weight_finite_huge", safetensors.numpy.save({**valid.tensors, head: huge_head}))
    var_name = next(n for n in valid.tensors if n.endswith(".bn.running_var"))
    negative_var = valid.tensors[var_name].copy()
    negative_var[0] = -1.0
    refused_tensors(
        "st_negative_running_var", safetensors.numpy.save({**valid.tensors, var_name: negative_var})
    )
    adapted = next(n for n in valid.tensors if n.endswith(".adapter.weight")).removesuffix(".adapter.weight")
    adapter = valid.manifest["adapter"]
    refused_manifest(
        "adapter_unit_ranks_huge",
        valid.manifest_bytes(adapter={**adapter, "unit_ranks": {adapted: 10**9}}),
        message_has="unit_ranks",
    )
    refused_manifest(
        "adapter_unit_ranks_unknown_unit",
        valid.manifest_bytes(adapter={**adapter, "unit_ranks": {"evil.unit": 1}}),
        message_has="unit_ranks",
    )
    refused_manifest(
        "manifest_input_size_above_server_limit",  # 2048 cost one 156-byte PNG 4 s and +975 MB
        valid.manifest_bytes(preprocessing={**pre, "input_size": 2048, "resize": 2048}),
        message_has="input_size",
    )
    wide = 1001  # the server's default max_classes is 1000; the head really has 1001 rows
    cols = valid.tensors[head].shape[1]
    wide_tensors = {
        **valid.tensors,
        head: np.zeros((wide, cols), np.float32),
        "head.bias": np.zeros(wide, np.float32),
    }
    wide_bytes = safetensors.numpy.save(wide_tensors)
    cases.append(
        UploadCase(
            "labels_above_max_classes",
            422,
            "invalid_artifact",
            parts=_multipart_parts(
                valid.manifest_bytes(labels=[f"c{i}" for i in range(wide)], sha256=sha256_hex(wide_bytes)),
                wide_bytes,
            ),
            message_has="limit",
        )
    )
    labels = valid.manifest["labels"]
    for name, label in (("line_separator", "a\u2028b"), ("paragraph_separator", "a\u2029b")):
        refused_manifest(f"label_{name}", valid.manifest_bytes(labels=[label, *labels[1:]]))
    refused_manifest(  # "café" precomposed and decomposed: one label to a reader
        "labels_equal_in_nfc", valid.manifest_bytes(labels=["caf\u00e9", "cafe\u0301", *labels[2:]])
    )
    refused_manifest(
        "labels_equal_once_trimmed", valid.manifest_bytes(labels=[labels[0], f" {labels[0]} ", *labels[2:]])
    )

    # Transport: auth, content types, multipart abuse.
    good_parts = _multipart_parts(good_manifest, good_tensors)
    thousand = tuple(Part(f"f{i}", b"x", f"f{i}.bin") for i in range(1000))
    cases += [
        UploadCase("no_token", 401, "unauthorized", parts=good_parts, auth=False),
        UploadCase("empty_raw_body", 422, "invalid_artifact", body=b"", content_type=tar),
        UploadCase(
            "text_plain_body", 415, "unsupported_media_type", body=good_manifest, content_type="text/plain"
        ),
        UploadCase("no_content_type", 415, "unsupported_media_type", body=good_tensors),
        UploadCase("multipart_manifest_only", 400, "bad_request", parts=good_parts[:1]),
        UploadCase(
            "multipart_tensors_as_text_field",
            400,
            "bad_request",
            parts=(good_parts[0], Part("tensors", good_tensors)),
        ),
        UploadCase("multipart_thousand_parts", 400, "bad_request", parts=thousand),
        UploadCase(
            "multipart_no_boundary",
            400,
            "bad_request",
            body=b'--x\r\nContent-Disposition: form-data; name="manifest"\r\n\r\n{}\r\n--x--\r\n',
            content_type="multipart/form-data",
        ),
        UploadCase(
            "multipart_unterminated",
            400,
            "bad_request",
            body=b'--xyz\r\nContent-Disposition: form-data; name="tensors"; filename="a"\r\n\r\n'
            + good_tensors[:100],
            content_type="multipart/form-data; boundary=xyz",
        ),
    ]
    return cases


# -- images ---------------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _png_with_header(width: int, height: int, idat: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _multipart_image_parts(count: int, data: bytes) -> tuple[Part, ...]:
    return tuple(Part("file", data, f"{i}.png", "image/png") for i in range(count))


def _repeat_last_scan(jpeg: bytes, times: int) -> bytes:
    last, end = jpeg.rindex(b"\xff\xda"), jpeg.rindex(b"\xff\xd9")
    return jpeg[:end] + jpeg[last:end] * times + jpeg[end:]


def image_cases(max_pixels: int) -> list[ImageCase]:
    """At least 30 hostile or odd images; `max_pixels` is the server's pixel limit (the bomb exceeds it)."""
    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8), "RGB")
    png, jpeg = _encode(rgb, "PNG"), _encode(rgb, "JPEG", quality=90)
    prog = _encode(rgb, "JPEG", progressive=True)
    side = math.isqrt(max_pixels) + 64
    bomb = _encode(Image.new("L", (side, side)), "PNG", optimize=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "A" * (16 * 1024 * 1024), zip=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    sixteen = Image.fromarray((rng.integers(0, 65536, (32, 40))).astype(np.uint16))
    corrupt_png = bytearray(png)
    corrupt_png[len(png) // 2] ^= 0xFF
    corrupt_jpeg = bytearray(jpeg)
    corrupt_jpeg[len(jpeg) // 2 : len(jpeg) // 2 + 40] = b"\xff" * 40
    frames = [rgb, rgb.rotate(90), rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="40" height="32"><rect width="40" height="32"/></svg>'
    ok, decoded = 200, "decoded"
    cases = [
        ImageCase("png_truncated_header", 415, "unsupported_media_type", png[:40]),  # unidentifiable
        ImageCase("png_truncated_data", 422, "corrupt_image", png[: len(png) // 2]),
        ImageCase("png_bad_crc_data", 422, "corrupt_image", bytes(corrupt_png)),
        ImageCase("jpeg_truncated_header", 422, "corrupt_image", jpeg[:100], "image/jpeg"),
        ImageCase("jpeg_garbled_scan", 422, "corrupt_image", bytes(corrupt_jpeg), "image/jpeg"),
        ImageCase("png_decompression_bomb", 413, "too_many_pixels", bomb),
        ImageCase(
            "png_header_claims_huge",
            413,
            "too_many_pixels",
            _png_with_header(100_000, 100_000, zlib.compress(b"\0" * 100)),
        ),
        ImageCase("png_header_zero_size", 415, "unsupported_media_type", _png_with_header(0, 0)),
        ImageCase("png_text_chunk_bomb", 422, "corrupt_image", _encode(rgb, "PNG", pnginfo=info)),
        ImageCase(
            "jpeg_cmyk", ok, None, _encode(rgb.convert("CMYK"), "JPEG"), "image/jpeg", reference=decoded
        ),
        ImageCase("png_16_bit_gray", ok, None, _encode(sixteen, "PNG"), reference="16bit"),
        ImageCase(
            "png_extreme_aspect_ratio",
            413,
            "too_many_pixels",
            _encode(Image.new("RGB", (30_000, 1), (50, 100, 150)), "PNG"),
        ),
        ImageCase("png_palette", ok, None, _encode(rgb.convert("P"), "PNG"), reference=decoded),
        ImageCase(
            "png_palette_transparency",
            ok,
            None,
            _encode(rgb.convert("P"), "PNG", transparency=0),
            reference=decoded,
        ),
        ImageCase("png_rgba", ok, None, _encode(rgb.convert("RGBA"), "PNG"), reference=decoded),
        ImageCase("png_gray_alpha", ok, None, _encode(rgb.convert("LA"), "PNG"), reference=decoded),
        ImageCase("png_one_bit", ok, None, _encode(rgb.convert("1"), "PNG"), reference=decoded),
        ImageCase(
            "png_animated_apng",
            ok,
            None,
            _encode(rgb, "PNG", save_all=True, append_images=frames[1:]),
            reference=decoded,
        ),
        ImageCase(
            "webp_animated",
            ok,
            None,
            _encode(rgb, "WEBP", save_all=True, append_images=frames[1:], lossless=True),
            "image/webp",
            reference=decoded,
        ),
        ImageCase("webp_lossy", ok, None, _encode(rgb, "WEBP", quality=80), "image/webp", reference=decoded),
        # Decided: served as stored, EXIF orientation ignored, like training's loader reads it (parity).
        ImageCase(
            "jpeg_exif_rotated",
            ok,
            None,
            _encode(rgb, "JPEG", exif=exif.tobytes()),
            "image/jpeg",
            reference=decoded,
        ),
        ImageCase(
            "jpeg_progressive",
            ok,
            None,
            _encode(rgb, "JPEG", progressive=True),
            "image/jpeg",
            reference=decoded,
        ),
        ImageCase(  # 18 scans: the most any encoder measured writes (domain_format/jpeg.py)
            "jpeg_progressive_cmyk",
            ok,
            None,
            _encode(rgb.convert("CMYK"), "JPEG", progressive=True),
            "image/jpeg",
            reference=decoded,
        ),
        # The last scan repeated 1000 times: a few KB, each scan one more pass over the image (issue 14)
        ImageCase("jpeg_scan_bomb", 422, "too_many_scans", _repeat_last_scan(prog, 1000), "image/jpeg"),
        ImageCase(
            "png_one_pixel",
            ok,
            None,
            _encode(Image.new("RGB", (1, 1), (9, 99, 199)), "PNG"),
            reference=decoded,
        ),
        ImageCase("jpeg_sent_as_png", ok, None, jpeg, "image/png", reference=decoded),
        ImageCase(
            "gif_animated",
            415,
            "unsupported_media_type",
            _encode(rgb, "GIF", save_all=True, append_images=frames[1:]),
            "image/png",
        ),
        ImageCase("gif_declared_gif", 415, "unsupported_media_type", _encode(rgb, "GIF"), "image/gif"),
        ImageCase("bmp", 415, "unsupported_media_type", _encode(rgb, "BMP")),
        ImageCase("tiff", 415, "unsupported_media_type", _encode(rgb, "TIFF")),
        ImageCase("ico", 415, "unsupported_media_type", _encode(rgb, "ICO")),
        ImageCase("svg_as_png", 415, "unsupported_media_type", svg),
        ImageCase("svg_declared_svg", 415, "unsupported_media_type", svg, "image/svg+xml"),
        ImageCase("zero_bytes", 422, "corrupt_image", b""),
        ImageCase(
            "text_posing_as_png", 415, "unsupported_media_type", b"this is not an image, honest\n" * 10
        ),
        ImageCase(
            "html_posing_as_jpeg",
            415,
            "unsupported_media_type",
            b"<html><script>alert(1)</script></html>",
            "image/jpeg",
        ),
        ImageCase("pickle_posing_as_png", 415, "unsupported_media_type", pickle.dumps({"a": 1})),
        ImageCase("png_magic_only", 415, "unsupported_media_type", png[:8]),
        ImageCase(
            "multipart_thousand_parts",
            400,
            "bad_request",
            multipart=_multipart_image_parts(1000, png),
            content_type="multipart",
        ),
        ImageCase(
            "multipart_no_file",
            400,
            "bad_request",
            multipart=(Part("note", b"hello"),),
            content_type="multipart",
        ),
        ImageCase(
            "json_thousand_images",
            400,
            "bad_request",
            json.dumps({"images": [base64.b64encode(png).decode()] * 1000}).encode(),
            "application/json",
        ),
        ImageCase(
            "json_bad_base64", 400, "bad_request", b'{"images": ["%%%not base64%%%"]}', "application/json"
        ),
        ImageCase(
            "json_nesting_bomb", 400, "bad_request", b"[" * 100_000 + b"]" * 100_000, "application/json"
        ),
    ]
    return cases


# -- files ----------------------------------------------------------------------------------------


def _dump_parts(parts: tuple[Part, ...], folder: Path, stem: str) -> list[dict[str, Any]]:
    out = []
    for i, part in enumerate(parts):
        blob = f"{stem}.part{i}"
        (folder / blob).write_bytes(part.data)
        out.append({**{k: v for k, v in asdict(part).items() if k != "data"}, "blob": blob})
    return out


def _load_parts(entries: list[dict[str, Any]], folder: Path) -> tuple[Part, ...]:
    return tuple(
        Part(e["field"], (folder / e["blob"]).read_bytes(), e["filename"], e["content_type"]) for e in entries
    )


def write_corpus(folder: Path, valid: ValidArtifact, marker: Path, max_pixels: int) -> Path:
    """Write every case's bytes and `index.json` (expectations) into `folder`; return the index path."""
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, list[dict[str, Any]]] = {"uploads": [], "images": []}
    for kind, cases in (("uploads", upload_cases(valid, marker)), ("images", image_cases(max_pixels))):
        for case in cases:
            entry = {k: v for k, v in asdict(case).items() if k not in ("body", "parts", "multipart")}
            stem = f"{kind}-{case.name}"
            body = case.body
            if body is not None:
                (folder / f"{stem}.body").write_bytes(body)
                entry["body"] = f"{stem}.body"
            parts = case.parts if isinstance(case, UploadCase) else case.multipart
            entry["parts"] = _dump_parts(parts, folder, stem)
            index[kind].append(entry)
    path = folder / "index.json"
    path.write_text(json.dumps(index, indent=1))
    return path


def load_corpus(folder: Path) -> tuple[list[UploadCase], list[ImageCase]]:
    index = json.loads((folder / "index.json").read_text())

    def common(entry: dict[str, Any]) -> dict[str, Any]:
        fields = {k: v for k, v in entry.items() if k not in ("body", "parts")}
        return fields

    uploads = [
        UploadCase(
            **common(e),
            body=(folder / e["body"]).read_bytes() if e.get("body") else None,
            parts=_load_parts(e["parts"], folder),
        )
        for e in index["uploads"]
    ]
    images = [
        ImageCase(
            **common(e),
            body=(folder / e["body"]).read_bytes() if e.get("body") else b"",
            multipart=_load_parts(e["parts"], folder),
        )
        for e in index["images"]
    ]
    return uploads, images


def _fabricated() -> ValidArtifact:
    from adapters_store.testing import make_domain_artifact

    files = make_domain_artifact(domain="birds")
    tensors = safetensors.numpy.load(files.tensor_bytes)
    return ValidArtifact(json.loads(files.manifest_bytes), dict(tensors))


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "hostile-corpus")
    index_path = write_corpus(out, _fabricated(), out / "PICKLE_RAN", max_pixels=1_000_000)
    loaded = load_corpus(out)
    print(f"{len(loaded[0])} uploads, {len(loaded[1])} images -> {index_path}")
