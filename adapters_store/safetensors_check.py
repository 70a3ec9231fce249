"""A pre-check of safetensors bytes that runs before the safetensors library sees them.

The library is careful, but the upload endpoint faces the network, so hostile bytes are first parsed
here with plain Python under our own limits: the 8-byte little-endian header length must lie within
the file and under a limit, the header must be a JSON object (no duplicated keys), every entry must
have a known dtype, a shape of non-negative ints and ``data_offsets`` that agree with shape x itemsize,
lie inside the data section, do not overlap and together cover it exactly. Pickles (``torch.save``
output, renamed or not) are recognised by their magic bytes and refused with a message that says what
to do instead.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath

from adapters_store.errors import Problem
from adapters_store.limits import Limits
from adapters_store.strict_json import StrictJSONError, loads_strict

# safetensors dtype code -> (spec dtype string, itemsize in bytes). Sub-byte formats are left out.
DTYPES: Mapping[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "I16": ("int16", 2),
    "U16": ("uint16", 2),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I32": ("int32", 4),
    "U32": ("uint32", 4),
    "F32": ("float32", 4),
    "I64": ("int64", 8),
    "U64": ("uint64", 8),
    "F64": ("float64", 8),
}

PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"})
EXPORT_HINT = (
    "pickled checkpoints are never loaded; export the tensors with safetensors "
    "(safetensors.torch.save_file(state_dict, 'adapter.safetensors'))"
)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it."""

    name: str
    dtype: str
    """Spec dtype string (``float32``, ``float16``, ``int64``...)."""
    shape: tuple[int, ...]
    begin: int
    end: int
    """Byte offsets inside the data section."""


@dataclass(frozen=True)
class HeaderCheck:
    """Result of ``check_safetensors``: the entries (when the header parsed) and every problem found."""

    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems


def looks_like_pickle(data: bytes, filename: str | None = None) -> Problem | None:
    """A problem when ``data`` (or its filename) is a pickle or a zip-wrapped pickle (torch.save)."""
    if filename is not None and PurePath(filename).suffix.lower() in PICKLE_SUFFIXES:
        return Problem("tensors", f"file name {filename!r} says pickle; {EXPORT_HINT}", "pickle")
    zip_magic = data.startswith(b"PK\x03\x04")
    pickle_magic = len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5
    if not (zip_magic or pickle_magic):
        return None
    # A real safetensors file whose header length happens to start with these bytes has a '{' at 8.
    if len(data) > 8 and data[8:9] == b"{":
        (n,) = struct.unpack_from("<Q", data, 0)
        if n <= len(data) - 8:
            return None
    kind = "a zip archive (torch.save format)" if zip_magic else f"a pickle (protocol {data[1]})"
    return Problem("tensors", f"content is {kind}, not safetensors; {EXPORT_HINT}", "pickle")


def check_safetensors(
    data: bytes, *, limits: Limits = Limits(), field: str = "tensors", filename: str | None = None
) -> HeaderCheck:
    """Check the structure of safetensors bytes without the safetensors library.

    ``field`` prefixes every problem (``tensors.header``, ``tensors[name]``). The data itself is not
    read (finiteness is checked after loading); only its extent is.
    """
    pickled = looks_like_pickle(data, filename)
    if pickled is not None:
        return HeaderCheck({}, {}, [Problem(field, pickled.message, pickled.code)])
    hfield = f"{field}.header"
    if len(data) < 8:
        return HeaderCheck(
            {}, {}, [Problem(field, f"truncated: {len(data)} bytes, no header length", "truncated")]
        )
    (n,) = struct.unpack_from("<Q", data, 0)
    if n > limits.max_header_bytes:
        msg = f"header length {n} bytes exceeds the limit of {limits.max_header_bytes}"
        return HeaderCheck({}, {}, [Problem(hfield, msg, "header_too_large")])
    if n > len(data) - 8:
        msg = f"truncated: header claims {n} bytes but only {len(data) - 8} follow the length"
        return HeaderCheck({}, {}, [Problem(field, msg, "truncated")])
    try:
        header = loads_strict(data[8 : 8 + n])
    except StrictJSONError as exc:
        code = "duplicate_key" if "duplicated key" in str(exc) else "header_json"
        return HeaderCheck({}, {}, [Problem(hfield, str(exc), code)])
    if not isinstance(header, dict):
        return HeaderCheck({}, {}, [Problem(hfield, "header is not a JSON object", "header_json")])

    problems: list[Problem] = []
    metadata: dict[str, str] = {}
    raw_meta = header.pop("__metadata__", {})
    if isinstance(raw_meta, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw_meta.items()
    ):
        metadata = raw_meta
    else:
        problems.append(Problem(f"{hfield}.__metadata__", "must map strings to strings", "header_entry"))
    if len(header) > limits.max_tensors:
        msg = f"{len(header)} tensors exceed the limit of {limits.max_tensors}"
        return HeaderCheck({}, metadata, [*problems, Problem(hfield, msg, "tensor_count")])

    data_len = len(data) - 8 - n
    entries: dict[str, TensorEntry] = {}
    for name, entry in header.items():
        tfield = f"{field}[{name[:80]}]"
        found = _check_entry(name, entry, data_len, limits, tfield)
        if isinstance(found, TensorEntry):
            entries[name] = found
        else:
            problems.extend(found)
    if len(entries) == len(header):
        # Only when every entry parsed: a bad entry would otherwise show up again as a gap.
        problems.extend(_check_layout(entries, data_len, hfield))
    return HeaderCheck(entries, metadata, problems)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_entry(
    name: str, entry: object, data_len: int, limits: Limits, tfield: str
) -> TensorEntry | list[Problem]:
    problems: list[Problem] = []
    if not name or len(name) > limits.max_tensor_name_length or not name.isprintable():
        problems.append(Problem(tfield, "tensor name is empty, too long or not printable", "header_entry"))
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        problems.append(
            Problem(
                tfield, "entry must be an object with exactly dtype, shape and data_offsets", "header_entry"
            )
        )
        return problems
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        problems.append(Problem(tfield, f"unknown dtype {dtype!r}", "header_dtype"))
    if (
        not isinstance(shape, list)
        or len(shape) > limits.max_dims
        or not all(_is_int(d) and d >= 0 for d in shape)
    ):
        msg = f"shape must be a list of at most {limits.max_dims} non-negative integers, got {shape!r:.80}"
        problems.append(Problem(tfield, msg, "header_shape"))
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        problems.append(
            Problem(tfield, f"data_offsets must be two integers, got {offsets!r:.80}", "header_offsets")
        )
    if problems:
        return problems
    begin, end = offsets
    if not 0 <= begin <= end:
        return [Problem(tfield, f"data_offsets [{begin}, {end}] are not an ordered pair", "header_offsets")]
    if end > data_len:
        msg = f"truncated: data_offsets end at {end} but the data section has only {data_len} bytes"
        return [Problem(tfield, msg, "truncated")]
    spec_dtype, itemsize = DTYPES[dtype]
    expected = math.prod(shape) * itemsize
    if end - begin != expected:
        msg = f"data_offsets span {end - begin} bytes but shape {shape} of {dtype} needs {expected}"
        return [Problem(tfield, msg, "header_offsets")]
    return TensorEntry(name, spec_dtype, tuple(shape), begin, end)


def _check_layout(entries: Mapping[str, TensorEntry], data_len: int, hfield: str) -> list[Problem]:
    # Tensors must tile the data section: overlaps alias memory, gaps hide bytes nobody validated.
    problems: list[Problem] = []
    position = 0
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin < position:
            problems.append(
                Problem(f"{hfield}", f"tensor {e.name!r} overlaps the previous tensor", "header_overlap")
            )
        elif e.begin > position:
            msg = f"{e.begin - position} unclaimed bytes before tensor {e.name!r}"
            problems.append(Problem(hfield, msg, "header_coverage"))
        position = max(position, e.end)
    if position != data_len:
        msg = f"{data_len - position} bytes after the last tensor are not claimed by any tensor"
        problems.append(Problem(hfield, msg, "header_coverage"))
    return problems
