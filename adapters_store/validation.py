"""Validation of untrusted artifacts: one pure function per artifact kind.

Used by the upload endpoint (before anything is written), the CLI and the trainer's export. Every
check that is cheap to run after an earlier one failed still runs, so an uploader sees all the
reasons at once. Order matters where it guards the next step: sizes before parsing, the
safetensors pre-check (``safetensors_check``) before the safetensors library, the library before
looking at values.

Result: ``ValidatedArtifact`` / ``ValidatedBackbone`` hold the parsed manifest, the tensor file's
bytes exactly as received (what the store writes; the manifest's sha256 is of these bytes) and the
tensors as numpy arrays (``torch.from_numpy`` makes them torch tensors without a copy).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import safetensors.numpy

from adapters_store.errors import ArtifactInvalid, Problem
from adapters_store.limits import Limits
from adapters_store.manifest import (
    BackboneManifest,
    DomainManifest,
    parse_backbone_manifest,
    parse_domain_manifest,
)
from adapters_store.safetensors_check import HeaderCheck, check_safetensors

M = TypeVar("M", DomainManifest, BackboneManifest)

DomainSpec = Mapping[str, tuple[tuple[int, ...], str]]
"""Tensor name -> (shape, dtype string) of a domain, as the model library computes it."""
SpecFor = Callable[[DomainManifest], DomainSpec]
"""Builds the expected spec of a manifest's domain (uses its adapter settings and label count)."""

# Spec dtypes that stand for "the manifest's floating dtype" (fp32 and fp16 uploads share one spec).
_FLOAT_SPEC_DTYPES = frozenset({"float32", "float16"})
# What safetensors.numpy can load; anything else (bf16, fp8) is refused before loading.
_NUMPY_DTYPES = frozenset(
    {
        "bool",
        "uint8",
        "int8",
        "int16",
        "uint16",
        "float16",
        "int32",
        "uint32",
        "float32",
        "int64",
        "uint64",
        "float64",
    }
)


@dataclass(frozen=True)
class ValidatedArtifact:
    """A domain artifact that passed every check; the only input ``AdapterStore.put`` accepts."""

    manifest: DomainManifest
    tensor_bytes: bytes
    """adapter.safetensors exactly as received (its sha256 is ``manifest.sha256``)."""
    tensors: Mapping[str, np.ndarray]
    """The same tensors loaded as numpy arrays."""


@dataclass(frozen=True)
class ValidatedBackbone:
    """A backbone artifact that passed every check; the input of ``AdapterStore.put_backbone``."""

    manifest: BackboneManifest
    tensor_bytes: bytes
    tensors: Mapping[str, np.ndarray]


def sha256_hex(data: bytes) -> str:
    """Lowercase hex sha256, the form manifests use."""
    return hashlib.sha256(data).hexdigest()


def validate_domain_artifact(
    manifest_bytes: bytes,
    tensor_bytes: bytes,
    *,
    spec_for: SpecFor,
    fingerprint: str,
    limits: Limits = Limits(),
    filename: str | None = None,
) -> ValidatedArtifact:
    """Check a domain artifact against the running backbone; raise ``ArtifactInvalid`` with every problem.

    ``spec_for(manifest)`` gives the expected tensors (typically
    ``model_artifacts.spec_for(net)``); an exception
    from it is reported as a problem of ``manifest.adapter``. ``fingerprint`` is the running backbone's.
    ``filename`` is the uploaded tensor file's name, when known (``.pt``/``.pth``/``.bin`` are refused).
    """
    problems: list[Problem] = []
    manifest = _parse_sized(manifest_bytes, parse_domain_manifest, limits, problems)
    header = _check_tensor_file(tensor_bytes, limits.max_tensor_bytes, limits, filename, problems)

    if manifest is not None:
        problems.extend(_check_labels(manifest.labels, limits))
        problems.extend(_check_input_size(manifest, limits))
        if manifest.backbone_fingerprint != fingerprint:
            msg = (
                f"adapter was trained on backbone {manifest.backbone_fingerprint[:16]}..., "
                f"the running backbone is {fingerprint[:16]}..."
            )
            problems.append(Problem("manifest.backbone_fingerprint", msg, "fingerprint"))
        if header is not None:
            problems.extend(_check_checksum(manifest.sha256, tensor_bytes))
        spec = _spec(spec_for, manifest, problems)
        if spec is not None and header is not None and header.ok:
            problems.extend(_compare_to_spec(header, spec, manifest.dtype))

    tensors = _load_checked(tensor_bytes, header, problems)
    if tensors is not None:
        problems.extend(_check_domain_values(tensors, limits))
    if problems:
        raise ArtifactInvalid(problems)
    assert manifest is not None and tensors is not None  # no problems means both parsed
    return ValidatedArtifact(manifest, tensor_bytes, tensors)


def validate_backbone_artifact(
    manifest_bytes: bytes,
    tensor_bytes: bytes,
    *,
    limits: Limits = Limits(),
    filename: str | None = None,
) -> ValidatedBackbone:
    """Check a backbone artifact: manifest schema, safetensors sanity, checksum, finite values.

    There is no spec: whether the weights fit the architecture is the model library's check (loading
    them), and whether they are the right ones is its fingerprint's.
    """
    problems: list[Problem] = []
    manifest = _parse_sized(manifest_bytes, parse_backbone_manifest, limits, problems)
    header = _check_tensor_file(tensor_bytes, limits.max_backbone_bytes, limits, filename, problems)
    if manifest is not None and header is not None:
        problems.extend(_check_checksum(manifest.sha256, tensor_bytes))
    tensors = _load_checked(tensor_bytes, header, problems)
    if problems:
        raise ArtifactInvalid(problems)
    assert manifest is not None and tensors is not None
    return ValidatedBackbone(manifest, tensor_bytes, tensors)


def _parse_sized(
    data: bytes, parse: Callable[[bytes], M], limits: Limits, problems: list[Problem]
) -> M | None:
    if len(data) > limits.max_manifest_bytes:
        msg = f"{len(data)} bytes exceed the limit of {limits.max_manifest_bytes}"
        problems.append(Problem("manifest", msg, "too_large"))
        return None
    try:
        return parse(data)
    except ArtifactInvalid as exc:
        problems.extend(exc.problems)
        return None


def _check_tensor_file(
    data: bytes, max_bytes: int, limits: Limits, filename: str | None, problems: list[Problem]
) -> HeaderCheck | None:
    """The header check, or None when the file is too large to look at."""
    if len(data) > max_bytes:
        problems.append(Problem("tensors", f"{len(data)} bytes exceed the limit of {max_bytes}", "too_large"))
        return None
    header = check_safetensors(data, limits=limits, filename=filename)
    problems.extend(header.problems)
    return header


def _check_checksum(expected: str, data: bytes) -> list[Problem]:
    actual = sha256_hex(data)
    if actual == expected:
        return []
    msg = f"sha256 of the tensor file is {actual}, the manifest says {expected}"
    return [Problem("manifest.sha256", msg, "checksum")]


def _check_labels(labels: list[str], limits: Limits) -> list[Problem]:
    problems = []
    if len(labels) > limits.max_labels:
        msg = f"{len(labels)} labels exceed the limit of {limits.max_labels}"
        problems.append(Problem("manifest.labels", msg, "labels"))
    long = [i for i, label in enumerate(labels) if len(label) > limits.max_label_length]
    if long:
        msg = f"labels at {long[:10]} are longer than {limits.max_label_length} characters"
        problems.append(Problem("manifest.labels", msg, "labels"))
    return problems


def _check_input_size(manifest: DomainManifest, limits: Limits) -> list[Problem]:
    # Preprocessing cost grows with the square of these (input_size 2048 cost one 156-byte PNG 4 s and
    # +975 MB), and nothing larger than what the backbone was built for serves it better.
    pre = manifest.preprocessing
    problems = []
    if pre.input_size > limits.max_input_size:
        msg = f"{pre.input_size} exceeds this server's limit of {limits.max_input_size}"
        problems.append(Problem("manifest.preprocessing.input_size", msg, "input_size"))
    if pre.resize > 2 * limits.max_input_size:  # crops in use keep 1.125 (72/64) to 1.14 (256/224) of it
        msg = (
            f"{pre.resize} exceeds this server's limit of {2 * limits.max_input_size} (twice its input size)"
        )
        problems.append(Problem("manifest.preprocessing.resize", msg, "input_size"))
    return problems


def _check_domain_values(tensors: Mapping[str, np.ndarray], limits: Limits) -> list[Problem]:
    """Values a trained domain never has and that break a forward though finite (see ``Limits.max_abs_value``).

    Non-finite values are ``_load_checked``'s; this runs on the finite remainder, so their counts do not
    overlap. A negative BN running_var makes running_var + eps negative or tiny: NaN or a huge scale."""
    problems = []
    bound = limits.max_abs_value
    for name, array in tensors.items():
        if not np.issubdtype(array.dtype, np.floating) or array.size == 0:
            continue
        values = array.astype(np.float32, copy=False)
        with np.errstate(invalid="ignore"):
            huge = int(np.count_nonzero((np.abs(values) > bound) & np.isfinite(values)))
        if huge:
            msg = f"{huge} values have magnitude above {bound:g} (no trained network has them)"
            problems.append(Problem(f"tensors[{name}]", msg, "magnitude"))
        if name.endswith(".running_var"):
            negative = int(np.count_nonzero(values < 0))
            if negative:
                msg = f"{negative} negative variances (a variance is >= 0)"
                problems.append(Problem(f"tensors[{name}]", msg, "magnitude"))
    return problems


def _spec(spec_for: SpecFor, manifest: DomainManifest, problems: list[Problem]) -> DomainSpec | None:
    try:
        return spec_for(manifest)
    except Exception as exc:  # the model library's refusal (bad allocation, rank...) is the uploader's fault
        msg = f"the backbone cannot build this adapter configuration: {type(exc).__name__}: {exc}"
        problems.append(Problem("manifest.adapter", msg, "spec"))
        return None


def _compare_to_spec(header: HeaderCheck, spec: DomainSpec, manifest_dtype: str) -> list[Problem]:
    problems = []
    for name, (shape, spec_dtype) in spec.items():
        want_dtype = manifest_dtype if spec_dtype in _FLOAT_SPEC_DTYPES else spec_dtype
        entry = header.entries.get(name)
        if entry is None:
            msg = f"missing: expected shape {tuple(shape)} {want_dtype}"
            problems.append(Problem(f"tensors[{name}]", msg, "missing_tensor"))
            continue
        if entry.shape != tuple(shape):
            msg = f"shape {entry.shape} but expected {tuple(shape)}"
            problems.append(Problem(f"tensors[{name}]", msg, "shape"))
        if entry.dtype != want_dtype:
            msg = f"dtype {entry.dtype} but expected {want_dtype} (the manifest's dtype is {manifest_dtype})"
            problems.append(Problem(f"tensors[{name}]", msg, "dtype"))
    for name in header.entries.keys() - spec.keys():
        problems.append(Problem(f"tensors[{name[:80]}]", "not part of this domain's spec", "extra_tensor"))
    return problems


def _load_checked(
    data: bytes, header: HeaderCheck | None, problems: list[Problem]
) -> dict[str, np.ndarray] | None:
    """Load with the safetensors library (only after the pre-check passed) and refuse non-finite values."""
    if header is None or not header.ok:
        return None
    unloadable = [e for e in header.entries.values() if e.dtype not in _NUMPY_DTYPES]
    for e in unloadable:
        problems.append(Problem(f"tensors[{e.name}]", f"dtype {e.dtype} is not accepted", "dtype"))
    if unloadable:
        return None
    try:
        tensors = safetensors.numpy.load(data)
    except Exception as exc:  # the library found something our pre-check did not
        problems.append(Problem("tensors", f"safetensors refused the file: {exc}", "load"))
        return None
    for name, array in tensors.items():
        if np.issubdtype(array.dtype, np.floating):
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            if bad:
                problems.append(
                    Problem(f"tensors[{name}]", f"{bad} non-finite values (NaN or inf)", "nonfinite")
                )
    return tensors
