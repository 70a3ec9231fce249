"""Hostile bytes of any shape are refused with ArtifactInvalid, never another exception."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters_store import ArtifactInvalid, unpack_bundle, validate_domain_artifact
from adapters_store.safetensors_check import check_safetensors
from adapters_store.testing import EXAMPLE_FINGERPRINT, make_domain_artifact, spec_for_labels

VALID = make_domain_artifact(labels=["a", "b", "c"])
BUNDLE = VALID.bundle()
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few bytes overwritten, a slice cut out, or bytes inserted."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        pos = draw(st.integers(0, max(len(out) - 1, 0)))
        if kind == "flip" and out:
            out[pos] = draw(st.integers(0, 255))
        elif kind == "cut":
            del out[pos : pos + draw(st.integers(1, 64))]
        elif kind == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            del out[pos:]
    return bytes(out)


def _validate(manifest: bytes, tensors: bytes) -> None:
    try:
        validate_domain_artifact(manifest, tensors, spec_for=spec_for_labels, fingerprint=EXAMPLE_FINGERPRINT)
    except ArtifactInvalid as exc:
        assert exc.problems


@FUZZ
@given(mutated(VALID.tensor_bytes))
def test_mutated_tensor_files(tensors: bytes) -> None:
    _validate(VALID.manifest_bytes, tensors)


@FUZZ
@given(mutated(VALID.manifest_bytes))
def test_mutated_manifests(manifest: bytes) -> None:
    _validate(manifest, VALID.tensor_bytes)


@FUZZ
@given(mutated(BUNDLE))
def test_mutated_bundles(bundle: bytes) -> None:
    try:
        manifest, tensors = unpack_bundle(bundle)
    except ArtifactInvalid:
        return
    _validate(manifest, tensors)


@FUZZ
@given(st.binary(max_size=2048), st.integers(0, 2**64 - 1))
def test_arbitrary_headers(header: bytes, length: int) -> None:
    for n in (len(header), length):
        check_safetensors(struct.pack("<Q", n) + header)
