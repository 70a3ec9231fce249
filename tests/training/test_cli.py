"""The `train` commands end to end on tiny data: backbone -> adapter (+ upload) -> evaluate -> compress."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from adapters_store.local import LocalStore
from adapters_store.manifest import parse_domain_manifest
from adapters_store.validation import validate_backbone_artifact
from multidomain.cli import main as multidomain_main
from tests.training.test_data import make_folder
from training import export
from training.cli import main

TINY = ["--input-size", "8", "--epochs", "1", "--batch-size", "8", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bb")
    code = main(
        ["backbone", "--arch", "resnet26", "--width", "0.125", "--data", "digits", "--train-per-class", "8",
         "--val-per-class", "4", "--out", str(out), *TINY]
    )  # fmt: skip
    assert code == 0
    return out


@pytest.fixture(scope="module")
def pets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data") / "pets", {"cat": 8, "dog": 8, "owl": 8})


def test_backbone_from_scratch_writes_both_artifacts(backbone: Path) -> None:
    net = export.read_backbone_network(backbone / "backbone")  # validated, fingerprint checked
    manifest = export.load_domain_into(net, backbone / "digits")
    assert manifest.adapter.kind == "bn" and manifest.labels == [str(i) for i in range(10)]
    assert manifest.provenance.epochs == 1 and manifest.provenance.val_accuracy is not None


def test_adapter_evaluate_compress(backbone: Path, pets: Path, tmp_path: Path, capsys) -> None:
    bb = str(backbone / "backbone")
    code = main(
        ["adapter", "--backbone", bb, "--data", str(pets), "--kind", "parallel", "--out", str(tmp_path / "pets"),
         "--bundle", str(tmp_path / "pets.tar"), "--checkpoint", str(tmp_path / "ck.pt"), *TINY]
    )  # fmt: skip
    assert code == 0
    manifest = parse_domain_manifest((tmp_path / "pets" / "manifest.json").read_bytes())
    assert manifest.domain == "pets" and manifest.labels == ["cat", "dog", "owl"]
    assert (tmp_path / "pets.tar").stat().st_size > 0 and (tmp_path / "ck.pt").exists()
    capsys.readouterr()

    code = main(["evaluate", "--backbone", bb, "--domain", str(tmp_path / "pets.tar"), "--data", str(pets),
                 "--domain", str(backbone / "digits"), "--data", "digits", "--confusion", str(tmp_path / "cm")])  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["domains"]
    assert [r["domain"] for r in result] == ["pets", "digits"]
    assert result[0]["images"] == 6 and result[0]["top5"] == 1.0 and 0.0 <= result[1]["top1"] <= 1.0
    assert Image.open(tmp_path / "cm" / "pets-confusion.png").format == "PNG"
    assert (tmp_path / "cm" / "digits-confusion.png").exists()

    code = main(["compress", "--backbone", bb, str(tmp_path / "pets"), "--energy", "1.0", "--data", str(pets),
                 "--out", str(tmp_path / "svd")])  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row = summary["domains"][0]
    assert row["accuracy_after"] == row["accuracy_before"]  # full rank: exact
    compressed = parse_domain_manifest((tmp_path / "svd" / "pets" / "manifest.json").read_bytes())
    assert compressed.domain == "pets" and compressed.adapter.kind == "lowrank"
    net = export.read_backbone_network(backbone / "backbone")
    export.load_domain_into(net, tmp_path / "svd" / "pets")  # validates against the backbone


def test_finetune_prints_json_and_multidomain_entry_point_dispatches(
    backbone: Path, pets: Path, capsys
) -> None:
    code = multidomain_main(
        ["train", "finetune", "--backbone", str(backbone / "backbone"), "--data", str(pets), *TINY]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["method"] == "finetune" and result["trainable_parameters"] > 0


def test_errors_are_one_line_and_exit_2(backbone: Path, pets: Path, tmp_path: Path, capsys) -> None:
    assert (
        main(
            [
                "adapter",
                "--backbone",
                str(tmp_path / "nope"),
                "--data",
                str(pets),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert main(["adapter", "--backbone", str(backbone / "backbone"), "--data", str(pets)]) == 2
    assert "nowhere to put the artifact" in capsys.readouterr().err
    assert main(["adapter", "--backbone", str(backbone / "backbone"), "--data", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "unknown data source" in capsys.readouterr().err
    assert (
        main(
            [
                "compress",
                "--backbone",
                str(backbone / "backbone"),
                str(tmp_path / "none"),
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "exactly one of --energy or --budget" in capsys.readouterr().err


def test_adapter_upload_to_a_running_server(backbone: Path, pets: Path, tmp_path: Path) -> None:
    from multidomain_client import MultidomainClient

    from server.app import create_app
    from server.serving import ServerThread
    from server.settings import Settings

    store = LocalStore(tmp_path / "store")
    manifest_bytes = (backbone / "backbone" / "manifest.json").read_bytes()
    tensor_bytes = (backbone / "backbone" / "backbone.safetensors").read_bytes()
    store.put_backbone(validate_backbone_artifact(manifest_bytes, tensor_bytes))
    settings = Settings(store_dir=store.root, admin_token="tok", bank_slots=2, revision_poll_s=0.0)  # type: ignore[call-arg,arg-type]
    with ServerThread(create_app(settings)) as server:
        code = main(["adapter", "--backbone", str(backbone / "backbone"), "--data", str(pets),
                     "--upload", server.url, "--token", "tok", *TINY])  # fmt: skip
        assert code == 0
        with MultidomainClient(server.url, token="tok") as client:
            assert client.describe("pets")["active"] == 1
            img = io.BytesIO()
            Image.open(next((pets / "owl").iterdir())).save(img, format="PNG")
            answer = client.classify("pets", img.getvalue(), top_k=3)
            labels = {e["label"] for e in answer["results"][0]["top_k"]}
            assert labels == {"cat", "dog", "owl"}
        code = main(["adapter", "--backbone", str(backbone / "backbone"), "--data", str(pets),
                     "--upload", server.url, "--token", "wrong", *TINY])  # fmt: skip
        assert code == 2


def test_backbone_import_of_torchvision_weights(tmp_path: Path) -> None:
    from model_artifacts import mobilenet_weights_installed, mobilenet_weights_path

    if not mobilenet_weights_installed():
        pytest.skip("offline MobileNetV2 weights not installed")
    code = main(["backbone", "--arch", "mobilenet_v2", "--import-torchvision", str(mobilenet_weights_path()),
                 "--out", str(tmp_path)])  # fmt: skip
    assert code == 0
    net = export.read_backbone_network(tmp_path / "backbone")
    manifest = export.load_domain_into(net, tmp_path / "imagenet")
    assert len(manifest.labels) == 1000 and manifest.adapter.kind == "head"
    assert (
        main(["backbone", "--arch", "mobilenet_v2", "--out", str(tmp_path / "x")]) == 2
    )  # neither data nor weights


def test_decathlon_tiny_preset_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "decathlon-tiny"
    assert main(["decathlon", "--preset", "tiny", "--threads", "1", "--out", str(out)]) == 0
    results = json.loads(out.with_suffix(".json").read_text())
    assert set(results["methods"]) == {"head", "bn", "finetune", "series", "parallel", "parallel+svd"}
    assert results["methods"]["head"]["params_multiplier"] == 1.0
    assert results["methods"]["finetune"]["params_multiplier"] == pytest.approx(3.0)  # backbone + 2 copies
    assert len(results["svd_sweep"]) == 6
    text = out.with_suffix(".md").read_text()
    assert "multidomain train decathlon --preset tiny" in text and "| parallel + SVD |" in text
    assert Image.open(out.with_suffix(".png")).format == "PNG"
