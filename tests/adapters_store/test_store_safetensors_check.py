"""The safetensors pre-check: one hostile file per rule, each refused with its own code."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from typing import Any

import numpy as np
import pytest
import safetensors.numpy

from adapters_store import Limits
from adapters_store.safetensors_check import check_safetensors, looks_like_pickle


def raw(header: dict[str, Any] | bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    """Hand-made safetensors bytes; ``length`` overrides the 8-byte header length."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def f32(begin: int, end: int, shape: list[int]) -> dict[str, Any]:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


def codes(data: bytes, **kwargs: Any) -> set[str]:
    return {p.code for p in check_safetensors(data, **kwargs).problems}


def test_a_real_file_passes_and_is_described() -> None:
    data = safetensors.numpy.save(
        {"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float16), "n": np.zeros((), np.int64)}
    )
    check = check_safetensors(data)
    assert check.ok, check.problems
    assert {n: (e.shape, e.dtype) for n, e in check.entries.items()} == {
        "a": ((2, 3), "float32"),
        "b": ((4,), "float16"),
        "n": ((), "int64"),
    }


def test_hand_made_file_passes() -> None:
    assert check_safetensors(raw({"a": f32(0, 8, [2]), "b": f32(8, 12, [1])}, bytes(12))).ok


def test_shorter_than_the_length_prefix() -> None:
    assert codes(b"\x01\x00\x00") == {"truncated"}


def test_header_length_beyond_the_file() -> None:
    assert codes(raw({"a": f32(0, 4, [1])}, bytes(4), length=1000)) == {"truncated"}


def test_truncated_data_section() -> None:
    data = safetensors.numpy.save({"a": np.zeros(100, np.float32)})
    problems = check_safetensors(data[:-10]).problems
    assert [(p.field, p.code) for p in problems] == [("tensors[a]", "truncated")]


def test_header_that_claims_10_gb() -> None:
    # 10 GB is beyond the file too; the limit is checked first so the message names the limit.
    problems = check_safetensors(raw({}, length=10 * 10**9)).problems
    assert [(p.field, p.code) for p in problems] == [("tensors.header", "header_too_large")]


def test_header_over_the_limit_even_when_present() -> None:
    data = raw({"a": f32(0, 4, [1]), "__metadata__": {"pad": "x" * 2000}}, bytes(4))
    assert check_safetensors(data).ok
    assert codes(data, limits=Limits(max_header_bytes=1000)) == {"header_too_large"}


def test_header_not_json() -> None:
    assert codes(raw(b"{not json", bytes(4))) == {"header_json"}


def test_header_not_an_object() -> None:
    assert codes(raw(b"[1, 2]")) == {"header_json"}


def test_header_with_duplicated_keys() -> None:
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    body = f'{{"a": {entry}, "a": {entry}}}'.encode()
    assert codes(raw(body, bytes(4))) == {"duplicate_key"}


def test_unknown_dtype() -> None:
    entry = {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}
    assert codes(raw({"a": entry}, bytes(16))) == {"header_dtype"}


@pytest.mark.parametrize("shape", [[-1], [1.5], [True], "4", [1] * 9, None])
def test_bad_shapes(shape: Any) -> None:
    entry = {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}
    assert codes(raw({"a": entry}, bytes(4))) == {"header_shape"}


@pytest.mark.parametrize("offsets", [[0], [0, 4, 8], [0.0, 4], ["0", "4"], [4, 0], [-4, 0]])
def test_malformed_offsets(offsets: Any) -> None:
    entry = {"dtype": "F32", "shape": [1], "data_offsets": offsets}
    assert codes(raw({"a": entry}, bytes(4))) == {"header_offsets"}


def test_offsets_disagree_with_shape() -> None:
    assert codes(raw({"a": f32(0, 8, [1])}, bytes(8))) == {"header_offsets"}


def test_overlapping_tensors() -> None:
    assert "header_overlap" in codes(raw({"a": f32(0, 8, [2]), "b": f32(4, 8, [1])}, bytes(8)))


def test_gap_between_tensors() -> None:
    assert codes(raw({"a": f32(0, 4, [1]), "b": f32(8, 12, [1])}, bytes(12))) == {"header_coverage"}


def test_unclaimed_trailing_bytes() -> None:
    assert codes(raw({"a": f32(0, 4, [1])}, bytes(8))) == {"header_coverage"}


def test_entry_with_extra_or_missing_keys() -> None:
    entry = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "evil": 1}
    assert codes(raw({"a": entry}, bytes(4))) == {"header_entry"}
    assert codes(raw({"a": {"dtype": "F32", "shape": [1]}}, bytes(4))) == {"header_entry"}


def test_bad_metadata() -> None:
    assert codes(raw({"__metadata__": {"k": 1}})) == {"header_entry"}


def test_too_many_tensors() -> None:
    header = {f"t{i}": f32(4 * i, 4 * i + 4, [1]) for i in range(5)}
    assert check_safetensors(raw(header, bytes(20))).ok
    assert codes(raw(header, bytes(20)), limits=Limits(max_tensors=4)) == {"tensor_count"}


def test_unprintable_tensor_name() -> None:
    assert codes(raw({"a\nb": f32(0, 4, [1])}, bytes(4))) == {"header_entry"}


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickles_are_refused_with_an_export_hint(protocol: int) -> None:
    data = pickle.dumps({"weight": [1.0, 2.0]}, protocol=protocol)
    problems = check_safetensors(data, filename="adapter.safetensors").problems
    assert [p.code for p in problems] == ["pickle"]
    assert "safetensors" in problems[0].message


def test_zip_pickle_is_refused() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:  # the layout of torch.save since PyTorch 1.6
        z.writestr("archive/data.pkl", pickle.dumps({"w": 1}, protocol=2))
    assert codes(buf.getvalue()) == {"pickle"}


def test_torch_save_output_is_refused() -> None:
    torch = pytest.importorskip("torch")
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buf)
    assert codes(buf.getvalue(), filename="adapter.safetensors") == {"pickle"}
    legacy = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, legacy, _use_new_zipfile_serialization=False)
    assert codes(legacy.getvalue()) == {"pickle"}


@pytest.mark.parametrize("name", ["adapter.pt", "model.PTH", "pytorch_model.bin", "x.ckpt"])
def test_pickle_file_names_are_refused(name: str) -> None:
    data = safetensors.numpy.save({"a": np.zeros(1, np.float32)})
    assert codes(data, filename=name) == {"pickle"}


def test_a_safetensors_file_whose_length_looks_like_pickle_magic_is_not_refused() -> None:
    # Header length 0x0280 = 640 starts with the bytes of pickle protocol 2.
    header: dict[str, Any] = {"a": f32(0, 4, [1]), "__metadata__": {"p": ""}}
    header["__metadata__"]["p"] = "x" * (640 - len(json.dumps(header)))
    data = raw(header, bytes(4))
    assert data[:2] == b"\x80\x02", data[:8]
    assert looks_like_pickle(data) is None
    assert check_safetensors(data).ok
