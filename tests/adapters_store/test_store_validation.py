"""validate_domain_artifact / validate_backbone_artifact: one failing artifact per rule."""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np
import pytest

from adapters_store import (
    ArtifactInvalid,
    DomainManifest,
    Limits,
    ValidatedArtifact,
    manifest_to_json,
    sha256_hex,
    validate_backbone_artifact,
    validate_domain_artifact,
)
from adapters_store.testing import (
    EXAMPLE_FINGERPRINT,
    ArtifactFiles,
    example_spec,
    make_backbone_artifact,
    make_domain_artifact,
    make_tensors,
    spec_for_labels,
)

LABELS = ["crow", "wren", "owl"]
SPEC = example_spec(len(LABELS))


def validate(files: ArtifactFiles, **kwargs: Any) -> ValidatedArtifact:
    kwargs.setdefault("spec_for", spec_for_labels)
    kwargs.setdefault("fingerprint", EXAMPLE_FINGERPRINT)
    return validate_domain_artifact(files.manifest_bytes, files.tensor_bytes, **kwargs)


def refused(files: ArtifactFiles, **kwargs: Any) -> list[tuple[str, str]]:
    with pytest.raises(ArtifactInvalid) as exc:
        validate(files, **kwargs)
    return [(p.field, p.code) for p in exc.value.problems]


def with_tensors(**changes: np.ndarray | None) -> ArtifactFiles:
    tensors: dict[str, np.ndarray] = make_tensors(SPEC)
    for name, value in changes.items():
        name = name.replace("__", ".")
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
    return make_domain_artifact(labels=LABELS, tensors=tensors)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_valid_artifact_round_trips(dtype: str) -> None:
    files = make_domain_artifact(labels=LABELS, dtype=dtype)
    result = validate(files)
    assert result.manifest == files.manifest
    assert result.tensor_bytes == files.tensor_bytes
    assert set(result.tensors) == set(SPEC)
    assert result.tensors["head.weight"].dtype == np.dtype(dtype)
    assert result.tensors["layers.0.bn.num_batches_tracked"].dtype == np.int64


def test_nan_tensor() -> None:
    bad = make_tensors(SPEC)["head.weight"].copy()
    bad[0, 0] = np.nan
    assert refused(with_tensors(head__weight=bad)) == [("tensors[head.weight]", "nonfinite")]


def test_inf_tensor_fp16() -> None:
    tensors = make_tensors(SPEC, dtype="float16")
    tensors["head.bias"][1] = np.inf
    files = make_domain_artifact(labels=LABELS, dtype="float16", tensors=tensors)
    assert refused(files) == [("tensors[head.bias]", "nonfinite")]


@pytest.mark.parametrize("value", [3e38, -3e38, 1.0001e4])
def test_finite_but_huge_head_weight(value: float) -> None:
    # ±3e38 is finite in float32 and was accepted: every logit became inf, classify answered nulls.
    bad = make_tensors(SPEC)["head.weight"].copy()
    bad[1, 2] = value
    assert refused(with_tensors(head__weight=bad)) == [("tensors[head.weight]", "magnitude")]


def test_magnitude_bound_is_inclusive_and_applies_to_every_tensor() -> None:
    tensors = make_tensors(SPEC)
    at_bound = tensors["layers.1.adapter.weight"].copy()
    at_bound.flat[0] = -1e4
    assert validate(with_tensors(layers__1__adapter__weight=at_bound)).tensors  # the bound itself passes
    big_mean = tensors["layers.0.bn.running_mean"].copy()
    big_mean[0] = 2e4
    files = with_tensors(layers__0__bn__running_mean=big_mean)
    assert refused(files) == [("tensors[layers.0.bn.running_mean]", "magnitude")]
    assert validate(files, limits=Limits(max_abs_value=1e5)).tensors  # the bound is a limit


def test_huge_fp16_value_is_refused() -> None:
    tensors = make_tensors(SPEC, dtype="float16")
    tensors["head.bias"][0] = 6e4  # finite in float16 (max 65504)
    files = make_domain_artifact(labels=LABELS, dtype="float16", tensors=tensors)
    assert refused(files) == [("tensors[head.bias]", "magnitude")]


def test_negative_running_var() -> None:
    var = make_tensors(SPEC)["layers.1.bn.running_var"].copy()
    var[0] = -1e-3
    assert refused(with_tensors(layers__1__bn__running_var=var)) == [
        ("tensors[layers.1.bn.running_var]", "magnitude")
    ]
    var[0] = 0.0  # a dead channel's variance: real (ImageNet MobileNetV2 has 5.6e-45), eps keeps it finite
    assert validate(with_tensors(layers__1__bn__running_var=var)).tensors


def test_nonfinite_values_are_not_also_counted_as_huge() -> None:
    bad = make_tensors(SPEC)["head.weight"].copy()
    bad[0, 0] = np.inf
    assert refused(with_tensors(head__weight=bad)) == [("tensors[head.weight]", "nonfinite")]


def test_input_size_and_resize_limits() -> None:
    pre = make_domain_artifact(labels=LABELS).manifest.preprocessing
    files = make_domain_artifact(
        labels=LABELS, preprocessing=pre.model_copy(update={"input_size": 64, "resize": 72})
    )
    assert validate(files, limits=Limits(max_input_size=64)).manifest.preprocessing.input_size == 64
    assert refused(files, limits=Limits(max_input_size=63)) == [
        ("manifest.preprocessing.input_size", "input_size")
    ]
    assert refused(files, limits=Limits(max_input_size=35)) == [
        ("manifest.preprocessing.input_size", "input_size"),
        ("manifest.preprocessing.resize", "input_size"),
    ]
    assert refused(files, limits=Limits(max_input_size=36)) == [
        ("manifest.preprocessing.input_size", "input_size")
    ]


def test_shape_off_by_one() -> None:
    bad = np.zeros((3, 9), np.float32)  # spec: (3, 8)
    assert refused(with_tensors(head__weight=bad)) == [("tensors[head.weight]", "shape")]


def test_extra_tensor() -> None:
    assert refused(with_tensors(evil=np.zeros(2, np.float32))) == [("tensors[evil]", "extra_tensor")]


def test_missing_tensor() -> None:
    assert refused(with_tensors(head__bias=None)) == [("tensors[head.bias]", "missing_tensor")]


def test_wrong_dtype() -> None:
    # The manifest says float32 (default); one tensor is float16.
    bad = np.zeros(3, np.float16)
    assert refused(with_tensors(head__bias=bad)) == [("tensors[head.bias]", "dtype")]


def test_manifest_dtype_applies_to_every_float_tensor() -> None:
    files = make_domain_artifact(labels=LABELS, tensors=make_tensors(SPEC, dtype="float32"), dtype="float16")
    problems = refused(files)
    assert problems and all(code == "dtype" for _, code in problems)
    assert len(problems) == sum(1 for _, d in SPEC.values() if d == "float32")


def test_non_float_spec_dtype_is_exact() -> None:
    bad = np.zeros((), np.int32)  # spec: int64
    assert refused(with_tensors(layers__0__bn__num_batches_tracked=bad)) == [
        ("tensors[layers.0.bn.num_batches_tracked]", "dtype")
    ]


def test_wrong_fingerprint() -> None:
    files = make_domain_artifact(labels=LABELS, fingerprint="f" * 64)
    assert refused(files) == [("manifest.backbone_fingerprint", "fingerprint")]


def test_wrong_checksum() -> None:
    files = make_domain_artifact(labels=LABELS, sha256="0" * 64)
    assert refused(files) == [("manifest.sha256", "checksum")]


def test_label_count_must_match_the_head() -> None:
    # Four labels, but the tensors carry a three-class head: the spec (from the labels) disagrees.
    files = make_domain_artifact(labels=LABELS, tensors=make_tensors(SPEC))
    files4 = make_domain_artifact(labels=[*LABELS, "gull"], tensors=make_tensors(SPEC))
    validate(files)
    assert set(refused(files4)) == {("tensors[head.weight]", "shape"), ("tensors[head.bias]", "shape")}


def test_label_count_limit() -> None:
    files = make_domain_artifact(labels=LABELS)
    assert refused(files, limits=Limits(max_labels=2)) == [("manifest.labels", "labels")]


def test_label_length_limit() -> None:
    files = make_domain_artifact(labels=["a" * 20, "b", "c"])
    validate(files)
    assert refused(files, limits=Limits(max_label_length=10)) == [("manifest.labels", "labels")]


def test_traversal_in_domain_name() -> None:
    files = make_domain_artifact(labels=LABELS, domain="../../etc")
    assert refused(files) == [("manifest.domain", "schema")]


def test_duplicated_keys_in_manifest() -> None:
    files = make_domain_artifact(labels=LABELS)
    text = files.manifest_bytes.decode().replace(
        '"dtype": "float32"', '"dtype": "float32", "dtype": "float16"'
    )
    bad = ArtifactFiles(files.manifest, text.encode(), files.tensor_bytes)
    assert refused(bad) == [("manifest", "duplicate_key")]


def test_pickle_disguised_as_safetensors() -> None:
    files = make_domain_artifact(labels=LABELS)
    payload = pickle.dumps({k: v.tolist() for k, v in make_tensors(SPEC).items()}, protocol=4)
    manifest = files.manifest.model_copy(update={"sha256": sha256_hex(payload)})
    bad = ArtifactFiles(manifest, manifest_to_json(manifest), payload)
    with pytest.raises(ArtifactInvalid) as exc:
        validate(bad, filename="adapter.safetensors")
    assert [p.code for p in exc.value.problems] == ["pickle"]
    assert "export" in exc.value.problems[0].message


def test_torch_checkpoint_named_pt() -> None:
    torch = pytest.importorskip("torch")
    buf = io.BytesIO()
    torch.save({"head.weight": torch.zeros(3, 8)}, buf)
    files = make_domain_artifact(labels=LABELS)
    bad = ArtifactFiles(files.manifest, files.manifest_bytes, buf.getvalue())
    assert ("tensors", "pickle") in refused(bad, filename="adapter.pt")


def test_truncated_tensor_file() -> None:
    files = make_domain_artifact(labels=LABELS)
    bad = ArtifactFiles(files.manifest, files.manifest_bytes, files.tensor_bytes[:-7])
    problems = refused(bad)
    assert ("manifest.sha256", "checksum") in problems
    assert any(code == "truncated" for _, code in problems)


def test_header_claiming_10_gb() -> None:
    files = make_domain_artifact(labels=LABELS)
    data = (10 * 10**9).to_bytes(8, "little") + files.tensor_bytes[8:]
    bad = ArtifactFiles(files.manifest, files.manifest_bytes, data)
    assert ("tensors.header", "header_too_large") in refused(bad)


def test_tensor_file_size_limit() -> None:
    files = make_domain_artifact(labels=LABELS)
    problems = refused(files, limits=Limits(max_tensor_bytes=len(files.tensor_bytes) - 1))
    assert problems == [("tensors", "too_large")]


def test_manifest_size_limit() -> None:
    files = make_domain_artifact(labels=LABELS)
    problems = refused(files, limits=Limits(max_manifest_bytes=len(files.manifest_bytes) - 1))
    assert problems == [("manifest", "too_large")]


def test_tensor_count_limit() -> None:
    files = make_domain_artifact(labels=LABELS)
    assert refused(files, limits=Limits(max_tensors=len(SPEC) - 1)) == [("tensors.header", "tensor_count")]


def test_unbuildable_adapter_config_is_a_problem_not_a_crash() -> None:
    def spec_for(manifest: DomainManifest) -> dict[str, tuple[tuple[int, ...], str]]:
        raise ValueError("unknown allocation 'sideways'")

    problems = refused(make_domain_artifact(labels=LABELS), spec_for=spec_for)
    assert problems == [("manifest.adapter", "spec")]


def test_spec_for_receives_the_parsed_manifest() -> None:
    seen: list[DomainManifest] = []

    def spec_for(manifest: DomainManifest) -> dict[str, tuple[tuple[int, ...], str]]:
        seen.append(manifest)
        return example_spec(len(manifest.labels))

    validate(make_domain_artifact(labels=LABELS), spec_for=spec_for)
    assert seen[0].labels == LABELS


def test_all_problems_are_collected() -> None:
    tensors = make_tensors(SPEC)
    tensors["head.weight"] = np.full((3, 8), np.nan, np.float32)
    del tensors["head.bias"]
    tensors["extra"] = np.zeros(1, np.float32)
    files = make_domain_artifact(labels=LABELS, tensors=tensors, fingerprint="e" * 64, sha256="0" * 64)
    codes = {code for _, code in refused(files)}
    assert codes == {"nonfinite", "missing_tensor", "extra_tensor", "fingerprint", "checksum"}


def test_problems_are_readable() -> None:
    with pytest.raises(ArtifactInvalid) as exc:
        validate(make_domain_artifact(labels=LABELS, fingerprint="f" * 64))
    assert "manifest.backbone_fingerprint" in str(exc.value)
    assert exc.value.codes() == {"fingerprint"}


def test_bf16_tensors_are_refused_before_loading() -> None:
    files = make_domain_artifact(labels=LABELS)
    torch = pytest.importorskip("torch")
    import safetensors.torch

    data = safetensors.torch.save({"head.weight": torch.zeros(3, 8, dtype=torch.bfloat16)})
    manifest = files.manifest.model_copy(update={"sha256": sha256_hex(data)})
    problems = refused(ArtifactFiles(manifest, manifest_to_json(manifest), data))
    assert ("tensors[head.weight]", "dtype") in problems


# -- backbone ----------------------------------------------------------------------------------------


def test_backbone_valid() -> None:
    files = make_backbone_artifact()
    result = validate_backbone_artifact(files.manifest_bytes, files.tensor_bytes)
    assert result.manifest == files.manifest
    assert set(result.tensors) == {"stem.weight", "layers.0.conv.weight"}


def test_backbone_nan() -> None:
    files = make_backbone_artifact({"w": np.array([1.0, np.nan], np.float32)})
    with pytest.raises(ArtifactInvalid) as exc:
        validate_backbone_artifact(files.manifest_bytes, files.tensor_bytes)
    assert [(p.field, p.code) for p in exc.value.problems] == [("tensors[w]", "nonfinite")]


def test_backbone_checksum() -> None:
    files = make_backbone_artifact(sha256="1" * 64)
    with pytest.raises(ArtifactInvalid) as exc:
        validate_backbone_artifact(files.manifest_bytes, files.tensor_bytes)
    assert exc.value.codes() == {"checksum"}


def test_backbone_pickle() -> None:
    files = make_backbone_artifact()
    with pytest.raises(ArtifactInvalid) as exc:
        validate_backbone_artifact(files.manifest_bytes, pickle.dumps([1, 2], protocol=2))
    assert "pickle" in exc.value.codes()


def test_backbone_size_limit() -> None:
    files = make_backbone_artifact()
    with pytest.raises(ArtifactInvalid) as exc:
        validate_backbone_artifact(
            files.manifest_bytes, files.tensor_bytes, limits=Limits(max_backbone_bytes=100)
        )
    assert exc.value.codes() == {"too_large"}


def test_safetensors_written_by_torch_validate() -> None:
    torch = pytest.importorskip("torch")
    import safetensors.torch

    tensors = {k: torch.from_numpy(v) for k, v in make_tensors(SPEC).items()}
    data = safetensors.torch.save(tensors)
    files = make_domain_artifact(labels=LABELS)
    manifest = files.manifest.model_copy(update={"sha256": sha256_hex(data)})
    assert validate(ArtifactFiles(manifest, manifest_to_json(manifest), data)).tensors.keys() == SPEC.keys()
