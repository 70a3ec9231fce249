"""``multidomain store``: management commands on a fabricated store, validate with the real model library."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from adapters_store import LocalStore, manifest_to_json
from adapters_store.testing import ArtifactFiles, make_domain_artifact, validated
from multidomain.store_cli import main
from tests.conftest import s3_url


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture
def populated(tmp_path: Path) -> Path:
    store = LocalStore(tmp_path / "store")
    store.put(validated(make_domain_artifact(domain="birds", seed=0)), activate=True)
    store.put(validated(make_domain_artifact(domain="birds", seed=1)))
    store.put(validated(make_domain_artifact(domain="cars")))
    return store.root


def test_list(populated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "list", "--store", str(populated))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["DOMAIN", "ACTIVE", "VERSIONS"]
    assert lines[1].split() == ["birds", "v1", "v1", "v2"]
    assert lines[2].split() == ["cars", "-", "v1"]


def test_store_dir_from_environment(
    populated: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MD_STORE_DIR", str(populated))
    code, out = run(capsys, "list")
    assert code == 0 and "birds" in out


def test_show(populated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "show", "birds", "--store", str(populated))
    assert code == 0
    assert "active:   v1" in out and "versions: v1 v2" in out and '"version": 1' in out
    code, out = run(capsys, "show", "birds", "--version", "2", "--store", str(populated))
    assert code == 0 and '"version": 2' in out


def test_activate_rollback_delete(populated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = LocalStore(populated)
    assert run(capsys, "activate", "birds", "2", "--store", str(populated))[0] == 0
    assert store.get("birds").version == 2
    assert run(capsys, "rollback", "birds", "--store", str(populated))[0] == 0
    assert store.get("birds").version == 1
    code, out = run(capsys, "delete", "birds", "--version", "1", "--store", str(populated))
    assert code == 1 and "StoreConflict" in out
    assert run(capsys, "delete", "birds", "--version", "2", "--store", str(populated))[0] == 0
    assert store.describe("birds").versions == (1,)
    assert run(capsys, "delete", "cars", "--store", str(populated))[0] == 0
    assert store.list_domains() == ["birds"]
    assert run(capsys, "verify", "--store", str(populated))[0] == 0
    (populated / "tmp" / "stale").write_bytes(b"left by a killed upload")
    assert run(capsys, "gc", "--store", str(populated)) == (
        0,
        "removed tmp/stale\n1 unlisted object(s) removed\n",
    )


def test_errors_exit_1_with_a_message(populated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "show", "nope", "--store", str(populated))
    assert code == 1 and "DomainNotFound" in out
    code, out = run(capsys, "activate", "birds", "9", "--store", str(populated))
    assert code == 1 and "VersionNotFound" in out
    code, out = run(capsys, "rollback", "cars", "--store", str(populated))
    assert code == 1 and "StoreConflict" in out


def test_commands_work_on_an_s3_store_and_copy_moves_a_store_both_ways(
    populated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], s3_env: object
) -> None:
    url = s3_url()
    code, out = run(capsys, "copy", str(populated), url)
    assert code == 0 and "copied 2 domain(s), 3 version(s)" in out, out
    code, out = run(capsys, "list", "--store", url)
    assert code == 0 and out.splitlines()[1].split() == ["birds", "v1", "v1", "v2"]
    assert run(capsys, "activate", "birds", "2", "--store", url)[0] == 0
    assert run(capsys, "delete", "cars", "--store", url)[0] == 0
    assert run(capsys, "verify", "--store", url) == (0, "store is consistent\n")
    assert run(capsys, "gc", "--store", url) == (0, "0 unlisted object(s) removed\n")
    code, out = run(capsys, "copy", url, str(tmp_path / "back"))
    assert code == 0 and "copied 1 domain(s), 2 version(s)" in out
    back = LocalStore(tmp_path / "back").describe("birds")
    assert (back.versions, back.active, back.previous) == ((1, 2), 2, (1,))
    code, out = run(capsys, "copy", url, str(tmp_path / "back"))  # its domains exist there now
    assert code == 1 and "StoreConflict" in out


def test_s3_store_from_the_environment(
    populated: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, s3_env: object
) -> None:
    url = s3_url()
    assert run(capsys, "copy", str(populated), url)[0] == 0
    monkeypatch.setenv("MD_STORE_DIR", str(populated.parent / "elsewhere"))
    monkeypatch.setenv("MD_STORE_URL", url)  # wins over MD_STORE_DIR
    code, out = run(capsys, "list")
    assert code == 0 and "cars" in out


def test_empty_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "list", "--store", str(tmp_path / "none"))
    assert code == 0 and "no domains" in out


# -- validate, against the real model library -----------------------------------------------------


@pytest.fixture(scope="module")
def real_backbone(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A resnet26 (width 0.25) backbone artifact and one of its domains, built with the model library."""
    pytest.importorskip("residual_adapters")
    import safetensors.torch

    from adapters_store import ArchitectureConfig, BackboneManifest, sha256_hex
    from residual_adapters import AdapterConfig, create_backbone

    net = create_backbone("resnet26", width=0.25)
    shared = safetensors.torch.save({k: v.contiguous() for k, v in net.shared_state_dict().items()})
    manifest = BackboneManifest(
        name="resnet26",
        architecture=ArchitectureConfig.model_validate(net.architecture),
        fingerprint=net.fingerprint(),
        sha256=sha256_hex(shared),
    )
    root = tmp_path_factory.mktemp("cli")
    backbone_dir = ArtifactFiles(
        manifest, manifest_to_json(manifest), shared, "backbone.safetensors"
    ).write_dir(root / "backbone")
    net.add_domain("birds", AdapterConfig(kind="parallel"), 3)
    tensors = {k: v.detach().numpy() for k, v in net.domain_state("birds").items()}
    return {"root": root, "backbone": backbone_dir, "tensors": tensors, "fingerprint": net.fingerprint()}


def _domain(real: dict[str, Any], **kwargs: Any) -> ArtifactFiles:
    kwargs.setdefault("labels", ["crow", "wren", "owl"])
    return make_domain_artifact(
        domain="birds", fingerprint=real["fingerprint"], tensors=real["tensors"], **kwargs
    )


def test_validate_a_valid_directory_and_bundle(
    real_backbone: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    files = _domain(real_backbone)
    directory = files.write_dir(real_backbone["root"] / "ok")
    bundle = real_backbone["root"] / "ok.tar"
    bundle.write_bytes(files.bundle())
    for artifact in (directory, bundle):
        code, out = run(capsys, "validate", str(artifact), "--backbone", str(real_backbone["backbone"]))
        assert code == 0, out
        assert out.startswith("valid: birds")


def test_validate_prints_every_reason(
    real_backbone: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    files = _domain(real_backbone, labels=["crow", "wren"], backbone_fingerprint="0" * 64)
    bundle = real_backbone["root"] / "bad.tar"
    bundle.write_bytes(files.bundle())
    code, out = run(capsys, "validate", str(bundle), "--backbone", str(real_backbone["backbone"]))
    assert code == 1
    assert "manifest.backbone_fingerprint" in out
    assert "tensors[head.weight]" in out and "tensors[head.bias]" in out


def test_validate_refuses_a_pickle(real_backbone: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    path = real_backbone["root"] / "adapter.pt"
    torch.save({"w": torch.zeros(2)}, path)
    code, out = run(capsys, "validate", str(path), "--backbone", str(real_backbone["backbone"]))
    assert code == 1 and "safetensors" in out


def test_validate_refuses_a_bad_adapter_config(
    real_backbone: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from adapters_store import AdapterSettings

    files = _domain(real_backbone, adapter=AdapterSettings(kind="parallel", allocation="sideways"))
    directory = files.write_dir(real_backbone["root"] / "sideways")
    code, out = run(capsys, "validate", str(directory), "--backbone", str(real_backbone["backbone"]))
    assert code == 1 and "manifest.adapter" in out


def test_validate_refuses_a_backbone_whose_weights_do_not_match(
    real_backbone: dict[str, Any], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    src: Path = real_backbone["backbone"]
    manifest = (src / "manifest.json").read_text()
    fake = tmp_path / "backbone"
    fake.mkdir()
    (fake / "backbone.safetensors").write_bytes((src / "backbone.safetensors").read_bytes())
    fingerprint = real_backbone["fingerprint"]
    (fake / "manifest.json").write_text(manifest.replace(fingerprint, "1" * 64))
    directory = _domain(real_backbone).write_dir(tmp_path / "ok")
    code, out = run(capsys, "validate", str(directory), "--backbone", str(fake))
    assert code == 1 and "backbone.manifest.fingerprint" in out


def test_put_and_put_backbone(
    real_backbone: dict[str, Any], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    store_dir = str(tmp_path / "store")
    assert run(capsys, "put-backbone", str(real_backbone["backbone"]), "--store", store_dir)[0] == 0
    directory = _domain(real_backbone).write_dir(tmp_path / "ok")
    args = ("put", str(directory), "--backbone", str(real_backbone["backbone"]), "--store", store_dir)
    code, out = run(capsys, *args, "--activate")
    assert code == 0 and "birds v1 (active)" in out
    assert LocalStore(store_dir).get("birds").version == 1
