"""The `train` commands end to end on tiny data: backbone -> adapter (+ upload) -> evaluate -> compress."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
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


def test_adapter_upload_to_a_running_server(backbone: Path, pets: Path, tmp_path: Path, capsys) -> None:
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
        # Four epochs: one leaves pets at chance, and --upload refuses a chance-level domain.
        code = main(["adapter", "--backbone", str(backbone / "backbone"), "--data", str(pets),
                     "--upload", server.url, "--token", "tok", *TINY, "--epochs", "4"])  # fmt: skip
        assert code == 0
        with MultidomainClient(server.url, token="tok") as client:
            assert client.describe("pets")["active"] == 1
            img = io.BytesIO()
            Image.open(next((pets / "owl").iterdir())).save(img, format="PNG")
            answer = client.classify("pets", img.getvalue(), top_k=3)
            labels = {e["label"] for e in answer["results"][0]["top_k"]}
            assert labels == {"cat", "dog", "owl"}
        capsys.readouterr()
        code = main(["adapter", "--backbone", str(backbone / "backbone"), "--data", str(pets),
                     "--upload", server.url, "--token", "wrong", *TINY, "--epochs", "4"])  # fmt: skip
        assert code == 2
        assert "upload failed" in capsys.readouterr().err  # the server refused it, not the usefulness check


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


def test_decathlon_tiny_preset_writes_the_report_and_resumes(tmp_path: Path) -> None:
    out, cache = tmp_path / "decathlon-tiny", tmp_path / "cache"
    args = ["decathlon", "--preset", "tiny", "--threads", "1", "--out", str(out), "--cache", str(cache)]
    args += ["--methods", "head,parallel+svd", "--seeds", "2", "--replicates", "50"]
    assert main(args) == 0
    results = json.loads(out.with_suffix(".json").read_text())
    stats = results["rowsets"]["resnet26"]
    # the baseline always runs (it defines E_max) and SVD needs the parallel adapters
    assert set(stats["methods"]) >= {
        "head",
        "finetune",
        "parallel",
        "parallel+svd",
        "svd shared, uncapped 0.5",
    }
    assert results["seeds"] == 2 and sorted(results["runs"]["resnet26"]) == ["0", "1"]
    assert stats["methods"]["head"]["params_multiplier"] == 1.0
    assert stats["methods"]["finetune"]["params_multiplier"] == pytest.approx(2.0)  # N networks, N = 2
    # 2 seeds x 2 domains x 3 rows, and one SVD evaluation per seed
    assert set(stats["e_max"]) == {"digits", "textures"} and results["runs_trained"] == 2 * 2 * 3 + 2
    text = out.with_suffix(".md").read_text()
    assert "multidomain train decathlon --preset tiny" in text and "| parallel + SVD |" in text
    assert "--seeds 2" in text and "## The paper's claims, as measured here" in text
    assert Image.open(out.with_suffix(".png")).format == "PNG"
    # A rerun reads every run from the cache and reports the same numbers.
    assert main(args) == 0
    again = json.loads(out.with_suffix(".json").read_text())
    assert again["runs_trained"] == 0 and again["runs_cached"] == results["runs_trained"]
    assert again["rowsets"] == results["rowsets"]
    # An unfinished experiment reported as it stands: the seed and the row not run are left out, and named.
    partial = [
        "--seeds",
        "3",
        "--replicates",
        "50",
        "--methods",
        "head,parallel+svd,parallel+he",
        "--report-only",
    ]
    assert main([*args[: args.index("--methods")], *partial]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["runs_trained"] == 0 and report["seeds"] == 2
    assert report["missing"] == {"resnet26": {"seeds": [2], "rows": ["parallel+he"]}}
    assert report["rowsets"]["resnet26"]["methods"] == results["rowsets"]["resnet26"]["methods"]
    assert "**Not finished in resnet26**" in out.with_suffix(".md").read_text()


def test_decathlon_refuses_unknown_domains_kinds_and_rows(tmp_path: Path, capsys) -> None:
    base = ["decathlon", "--preset", "tiny", "--out", str(tmp_path / "x"), "--cache", str(tmp_path / "c")]
    assert main([*base, "--domains", "digits,nope"]) == 2
    assert "unknown domains ['nope']" in capsys.readouterr().err
    assert main([*base, "--kinds", "nope"]) == 2
    assert "unknown adapter kind 'nope'" in capsys.readouterr().err
    assert main([*base, "--methods", "nope"]) == 2
    assert "unknown methods ['nope']" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # refused before anything ran


def test_a_diverged_parallel_run_is_scored_as_such_by_the_svd_rows(tmp_path: Path) -> None:
    """A parallel run that diverged keeps no tensors: its SVD rows are its own majority-class answers, and
    the other domains are still compressed."""
    out, cache = tmp_path / "div", tmp_path / "c"
    args = ["decathlon", "--preset", "tiny", "--out", str(out), "--cache", str(cache), "--seeds", "1"]
    args += ["--methods", "parallel+svd", "--replicates", "20"]
    assert main(args) == 0
    run_file = cache / "resnet26" / "seed0" / "digits" / "parallel.json"
    stored = json.loads(run_file.read_text())
    majority = "".join("ff" if i % 2 else "00" for i in range(len(stored["record"]["test_correct"]) // 2))
    stored["record"].update(diverged=True, test_correct=majority)
    run_file.write_text(json.dumps(stored))
    run_file.with_suffix(".safetensors").unlink()
    (cache / "resnet26" / "seed0" / "_svd" / "sweep.json").unlink()
    assert main(args) == 0
    runs = json.loads(out.with_suffix(".json").read_text())["runs"]["resnet26"]["0"]
    assert runs["digits"]["parallel+svd"]["test_correct"] == majority
    assert runs["digits"]["svd shared 0.5"]["diverged"] is True
    assert "diverged" not in runs["textures"]["parallel+svd"]


def test_decathlon_adds_a_row_for_any_registered_kind(tmp_path: Path) -> None:
    out = tmp_path / "kinds"
    args = [
        "decathlon",
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--cache",
        str(tmp_path / "c"),
        "--seeds",
        "1",
    ]
    assert main([*args, "--kinds", "lowrank", "--methods", "lowrank", "--replicates", "20"]) == 0
    methods = json.loads(out.with_suffix(".json").read_text())["rowsets"]["resnet26"]["methods"]
    assert list(methods) == ["finetune", "lowrank"]


def _uniform_folder(root: Path, classes: list[str], per_class: int) -> Path:
    """Every image the same grey: no network can tell the classes apart, so accuracy is chance exactly."""
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (12, 12), (128, 128, 128)).save(root / name / f"{i}.png")
    return root


def test_a_chance_level_domain_is_refused_by_upload_unless_forced(
    backbone: Path, tmp_path: Path, capsys
) -> None:
    from multidomain_client import MultidomainClient, NotFound

    from server.app import create_app
    from server.serving import ServerThread
    from server.settings import Settings

    noise = _uniform_folder(tmp_path / "noise", ["a", "b", "c"], 10)
    store = LocalStore(tmp_path / "store")
    manifest_bytes = (backbone / "backbone" / "manifest.json").read_bytes()
    tensor_bytes = (backbone / "backbone" / "backbone.safetensors").read_bytes()
    store.put_backbone(validate_backbone_artifact(manifest_bytes, tensor_bytes))
    settings = Settings(store_dir=store.root, admin_token="tok", bank_slots=2, revision_poll_s=0.0)  # type: ignore[call-arg,arg-type]
    bb = str(backbone / "backbone")
    with ServerThread(create_app(settings)) as server:
        capsys.readouterr()
        code = main(["adapter", "--backbone", bb, "--data", str(noise), "--upload", server.url, "--token", "tok",
                     "--out", str(tmp_path / "kept"), *TINY])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2
        assert (
            "not uploading noise: best validation accuracy 0.3333 is not clearly above always guessing" in err
        )
        assert "(0.3333 on 6 validation images; needs 0.4333)" in err and "--force" in err
        assert (tmp_path / "kept" / "manifest.json").exists()  # written locally, to look at
        with MultidomainClient(server.url, token="tok") as client, pytest.raises(NotFound):
            client.describe("noise")
        code = main(["adapter", "--backbone", bb, "--data", str(noise), "--upload", server.url, "--token", "tok",
                     "--force", *TINY])  # fmt: skip
        assert code == 0
        assert "warning: best validation accuracy 0.3333" in capsys.readouterr().err
        with MultidomainClient(server.url, token="tok") as client:
            detail = client.describe("noise")
        assert detail["active"] == 1
        assert detail["manifest"]["provenance"]["val_accuracy"] == pytest.approx(1 / 3)


def test_usefulness_floor_is_ten_points_or_half_the_way_to_perfect() -> None:
    from training.cli import usefulness_floor
    from training.data import DomainData, ImageSet

    def floor(targets: list[int]) -> tuple[float, float]:
        val = ImageSet(torch.zeros(len(targets), 1, 2, 2, dtype=torch.uint8), torch.tensor(targets))
        return usefulness_floor(DomainData("d", ["a", "b"], val, val, None, None, False, ""))  # type: ignore[arg-type]

    assert floor([0, 1] * 50) == pytest.approx((0.5, 0.6))
    assert floor([0] * 90 + [1] * 10) == pytest.approx((0.9, 0.95))  # 10 points would need 100%


def test_a_diverging_run_stops_with_the_rate_and_what_to_try(backbone: Path, tmp_path: Path, capsys) -> None:
    code = main(["adapter", "--backbone", str(backbone / "backbone"), "--data", "digits", "--train-per-class", "40",
                 "--val-per-class", "5", "--lr", "5", "--out", str(tmp_path / "hot"),
                 *TINY[:2], "--epochs", "3", "--batch-size", "32", *TINY[6:]])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "error: TrainingDiverged: training diverged:" in err
    assert "with learning rate 5; lower the learning rate (try --lr 0.5)" in err
    assert not (tmp_path / "hot").exists()  # nothing written


def test_defaults_come_from_the_recipe_and_lowrank_has_a_default_rank(
    backbone: Path, pets: Path, tmp_path: Path, capsys
) -> None:
    from training.recipes import DEFAULT_LOWRANK_RANK, recipe_for

    code = main(["adapter", "--backbone", str(backbone / "backbone"), "--data", str(pets), "--kind", "lowrank",
                 "--out", str(tmp_path / "lr"), *TINY])  # fmt: skip
    assert code == 0
    recipe = recipe_for("resnet26", "lowrank")
    assert f"settings: lr {recipe.lr:g}, warm-up {recipe.warmup_epochs:g} epochs" in capsys.readouterr().err
    manifest = parse_domain_manifest((tmp_path / "lr" / "manifest.json").read_bytes())
    assert manifest.adapter.kind == "lowrank" and manifest.adapter.rank == DEFAULT_LOWRANK_RANK


def test_val_data_and_train_val_folders_on_the_command_line(backbone: Path, tmp_path: Path, capsys) -> None:
    from tests.training.test_data import make_folder

    make_folder(tmp_path / "zoo" / "train", {"cat": 6, "dog": 6})
    make_folder(tmp_path / "zoo" / "val", {"cat": 3, "dog": 3})
    make_folder(tmp_path / "other", {"cat": 2, "emu": 2})
    bb = str(backbone / "backbone")
    capsys.readouterr()
    assert main(["adapter", "--backbone", bb, "--data", str(tmp_path / "zoo"), "--out",
                 str(tmp_path / "a"), *TINY]) == 0  # fmt: skip
    assert "data zoo: 2 classes, 12 train / 6 val images" in capsys.readouterr().err
    assert main(["adapter", "--backbone", bb, "--data", str(tmp_path / "zoo" / "train"), "--val-data",
                 str(tmp_path / "other"), "--out", str(tmp_path / "b"), *TINY]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "must hold the same classes" in err and "lacks ['dog'], has extra ['emu']" in err
