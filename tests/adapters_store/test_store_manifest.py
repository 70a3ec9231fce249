"""Manifest schema: strict JSON, safe domain names, labels, preprocessing, adapter settings."""

from __future__ import annotations

import json
from typing import Any

import pytest

from adapters_store import ArtifactInvalid, is_safe_domain_name, manifest_to_json, parse_domain_manifest
from adapters_store.testing import make_backbone_artifact, make_domain_artifact


def _manifest_dict() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(make_domain_artifact().manifest_bytes)
    return result


def _problems(data: dict[str, Any] | bytes) -> list[tuple[str, str]]:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    with pytest.raises(ArtifactInvalid) as exc:
        parse_domain_manifest(raw)
    return [(p.field, p.code) for p in exc.value.problems]


def test_round_trip() -> None:
    files = make_domain_artifact()
    parsed = parse_domain_manifest(files.manifest_bytes)
    assert parsed == files.manifest
    assert manifest_to_json(parsed) == files.manifest_bytes


def test_adapter_settings_dump_has_exactly_the_model_library_fields() -> None:
    dumped = make_domain_artifact().manifest.adapter.model_dump()  # type: ignore[union-attr]
    assert set(dumped) == {"kind", "rank", "allocation", "pointwise_budget", "unit_ranks"}


def test_version_may_be_absent_in_an_upload() -> None:
    d = _manifest_dict()
    del d["version"]
    assert parse_domain_manifest(json.dumps(d).encode()).version == 0


def test_duplicated_json_keys_refused() -> None:
    text = make_domain_artifact().manifest_bytes.decode()
    # Same key twice: a later "domain" would win in json.loads and in pydantic, hiding the first.
    doubled = text.replace('"domain": "example",', '"domain": "example", "domain": "other",', 1)
    assert doubled != text
    assert _problems(doubled.encode()) == [("manifest", "duplicate_key")]


def test_nan_constant_refused() -> None:
    d = _manifest_dict()
    raw = json.dumps(d).replace('"epochs": 1', '"epochs": NaN').encode()
    assert _problems(raw) == [("manifest", "json")]


def test_not_json_and_not_object() -> None:
    assert _problems(b"\xff\xfe") == [("manifest", "json")]
    assert _problems(b"[1, 2]") == [("manifest", "json")]


@pytest.mark.parametrize(
    "name",
    [
        "../etc",
        "a/b",
        "..",
        ".hidden",
        "Birds",
        "b\u00efrds",
        "birds\n",
        "",
        "a" * 65,
        "-birds",
        "bi rds",
        "a\x00",
    ],
)
def test_unsafe_domain_names_refused(name: str) -> None:
    d = _manifest_dict()
    d["domain"] = name
    assert ("manifest.domain", "schema") in _problems(d)
    assert not is_safe_domain_name(name)


@pytest.mark.parametrize("name", ["birds", "cifar-100", "a", "x_1", "0" + "a" * 63])
def test_safe_domain_names_accepted(name: str) -> None:
    d = _manifest_dict()
    d["domain"] = name
    assert parse_domain_manifest(json.dumps(d).encode()).domain == name


@pytest.mark.parametrize(
    ("labels", "field"),
    [
        ([], "manifest.labels"),
        (["a", "a", "b"], "manifest.labels"),
        (["a", ""], "manifest.labels[1]"),
        (["a", "  "], "manifest.labels[1]"),
        (["a", "b\x07"], "manifest.labels[1]"),
        (["a", 3], "manifest.labels[1]"),
        (["a", "line\u2028break"], "manifest.labels[1]"),  # line separator (Zl)
        (["a", "para\u2029break"], "manifest.labels[1]"),  # paragraph separator (Zp)
        (["a", "b\u0085c"], "manifest.labels[1]"),  # NEL, a C1 control
        (["a", "caf\u00e9", "cafe\u0301"], "manifest.labels"),  # equal in NFC (precomposed, decomposed)
        (["cat", "cat "], "manifest.labels"),  # equal once trimmed
        (["\u00a0cat", "cat"], "manifest.labels"),  # a no-break space trims too
    ],
)
def test_bad_labels_refused(labels: list[Any], field: str) -> None:
    d = _manifest_dict()
    d["labels"] = labels
    assert (field, "schema") in _problems(d)


def test_labels_that_only_look_alike_to_a_machine_are_kept() -> None:
    # Case and inner spaces are visible to a reader: distinct labels, accepted.
    d = _manifest_dict()
    d["labels"] = ["Cat", "cat", "sea lion", "sealion", "caf\u00e9"]
    assert parse_domain_manifest(json.dumps(d).encode()).labels == d["labels"]


def test_unknown_field_refused() -> None:
    d = _manifest_dict()
    d["extra"] = 1
    assert ("manifest.extra", "schema") in _problems(d)


def test_future_format_version_refused() -> None:
    d = _manifest_dict()
    d["format_version"] = 3
    assert ("manifest.format_version", "schema") in _problems(d)


def test_format_2_is_exactly_the_artifacts_with_depthwise_deltas() -> None:
    d = _manifest_dict()
    assert d["format_version"] == 1 and d["adapter"]["kind"] != "depthwise"
    d["format_version"] = 2  # a parallel artifact claiming the newer format
    with pytest.raises(ArtifactInvalid, match="format_version 2 does not fit adapter kind"):
        parse_domain_manifest(json.dumps(d).encode())
    d["adapter"]["kind"] = "depthwise"
    assert parse_domain_manifest(json.dumps(d).encode()).format_version == 2
    d["format_version"] = 1  # a format-1 reader would serve it without its deltas
    assert _problems(d) == [("manifest", "schema")]
    del d["format_version"]  # absent means 1
    assert _problems(d) == [("manifest", "schema")]


def test_no_type_coercion() -> None:
    d = _manifest_dict()
    d["provenance"]["epochs"] = "3"
    assert ("manifest.provenance.epochs", "schema") in _problems(d)


def test_bad_fingerprint_and_sha_format() -> None:
    d = _manifest_dict()
    d["backbone_fingerprint"] = "ABC"
    d["sha256"] = "0" * 63
    assert {("manifest.backbone_fingerprint", "schema"), ("manifest.sha256", "schema")} <= set(_problems(d))


def test_dtype_must_be_float32_or_float16() -> None:
    d = _manifest_dict()
    d["dtype"] = "bfloat16"
    assert ("manifest.dtype", "schema") in _problems(d)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"resize": 32}, "manifest.preprocessing"),
        ({"mean": [0.5, 0.5]}, "manifest.preprocessing.mean"),
        ({"std": [0.5, 0.0, 0.5]}, "manifest.preprocessing.std[1]"),
        ({"channels": "bgr"}, "manifest.preprocessing.channels"),
        ({"interpolation": "magic"}, "manifest.preprocessing.interpolation"),
        ({"input_size": 0}, "manifest.preprocessing.input_size"),
    ],
)
def test_bad_preprocessing_refused(change: dict[str, Any], field: str) -> None:
    d = _manifest_dict()
    d["preprocessing"].update(change)
    assert (field, "schema") in _problems(d)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"kind": "magic"}, "manifest.adapter.kind"),
        ({"rank": 0}, "manifest.adapter.rank"),
        ({"pointwise_budget": 0.0}, "manifest.adapter.pointwise_budget"),
        ({"unit_ranks": {"layer1": 0}}, "manifest.adapter.unit_ranks.layer1"),
    ],
)
def test_bad_adapter_settings_refused(change: dict[str, Any], field: str) -> None:
    d = _manifest_dict()
    d["adapter"].update(change)
    assert (field, "schema") in _problems(d)


def test_created_at_needs_a_timezone() -> None:
    d = _manifest_dict()
    d["provenance"]["created_at"] = "2024-01-01T00:00:00"
    assert ("manifest.provenance.created_at", "schema") in _problems(d)


def test_backbone_manifest_round_trip() -> None:
    from adapters_store import parse_backbone_manifest

    files = make_backbone_artifact(architecture={"name": "resnet26", "kwargs": {"width": 0.25}})
    parsed = parse_backbone_manifest(files.manifest_bytes)
    assert parsed.architecture.model_dump() == {"name": "resnet26", "kwargs": {"width": 0.25}}
