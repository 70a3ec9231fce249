"""The studies as commands: allocation and transfer on a tiny ResNet-26 (width 0.125, 16 px, digits, 1 epoch).

Checks the tables' shape, that each allocation row trains adapters exactly in the units it names (and the
shared weights never), that parameter counts are the model family's own, that an interrupted study
resumes without redoing finished rows (and gives the same numbers), and the CLI's outputs and errors.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from model_artifacts import backbone_artifact
from residual_adapters import AdapterConfig, MultiDomainNet
from residual_adapters.config import select_units
from training.backbones import BackboneSpecError, load_backbone
from training.cli import main
from training.experiment import DomainEntry
from training.studies import allocation, transfer
from training.studies.common import StudyError
from training.studies.transfer import ALL, TransferSettings, schedule, subset

TINY_ALLOCATION = allocation.TINY
TINY_TRANSFER = transfer.TINY


class Interrupted(Exception):
    """Stands for a kill between two rows."""


def _quiet(_: str) -> None:
    pass


def _snapshot(net: MultiDomainNet, domain: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.domain_state(domain).items()}


# -- allocation ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def allocation_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny allocation study; every row's trained domain and the shared weights before/after."""
    out = tmp_path_factory.mktemp("allocation") / "alloc.json"
    trained: dict[str, dict[str, torch.Tensor]] = {}
    shared_after: dict[str, str] = {}

    def after_row(net: MultiDomainNet, domain: str, row: dict[str, Any]) -> None:
        trained[row["row"]] = _snapshot(net, domain)
        shared_after[row["row"]] = net.fingerprint()  # a hash of the architecture and every shared tensor

    results = allocation.run_allocation(TINY_ALLOCATION, out, log=_quiet, after_row=after_row)
    return {"results": results, "trained": trained, "shared_after": shared_after, "path": out}


def test_allocation_table_has_one_row_per_allocation_with_the_model_family_counts(
    allocation_run: dict[str, Any],
) -> None:
    results = allocation_run["results"]
    net = load_backbone(TINY_ALLOCATION.backbone)
    rank = results["lowrank_rank"]
    table = allocation.table(results)
    assert [t["row"] for t in table] == list(allocation.ROWS)
    assert len(results["rows"]) == len(allocation.ROWS) * len(TINY_ALLOCATION.domains)
    shared = net.shared_parameter_count
    for t in table:
        cfg = allocation.row_config(net, t["row"], rank)
        counts = net.domain_parameter_counts(cfg, 10)
        assert t["adapter_parameters"] == counts["adapter"]
        assert t["adapter_percent_of_backbone"] == pytest.approx(100 * counts["adapter"] / shared)
        row = results["rows"][f"digits/{t['row']}"]
        assert (row["adapter"], row["bn"], row["head"]) == (counts["adapter"], counts["bn"], counts["head"])
        # The trained tensors themselves add up to the same counts.
        tensors = allocation_run["trained"][t["row"]]
        adapter_numel = sum(v.numel() for k, v in tensors.items() if ".adapter." in k)
        assert adapter_numel == counts["adapter"]
        assert 0.0 <= t["accuracy"]["digits"] <= 1.0 and t["mean_accuracy"] == t["accuracy"]["digits"]
    by_row = {t["row"]: t for t in table}
    assert by_row["none"]["adapter_parameters"] == 0
    assert by_row["all"]["adapter_parameters"] > by_row["shallow+deep"]["adapter_parameters"]
    assert (
        by_row["shallow+deep"]["adapter_parameters"]
        == by_row["shallow"]["adapter_parameters"] + by_row["deep"]["adapter_parameters"]
    )
    md = allocation.markdown_table(results).splitlines()
    assert len(md) == 2 + len(allocation.ROWS)
    assert f"(r={rank})" in md[-1]


def test_lowrank_rank_is_the_closest_to_the_deep_third() -> None:
    net = load_backbone(TINY_ALLOCATION.backbone)
    target = net.domain_parameter_counts(AdapterConfig(allocation="deep"), 10)["adapter"]
    gaps = {
        r: abs(net.domain_parameter_counts(AdapterConfig(kind="lowrank", rank=r), 10)["adapter"] - target)
        for r in range(1, 65)
    }
    best = min(gaps.values())
    assert allocation.matching_rank(net, 10) == min(r for r, g in gaps.items() if g == best)


def test_allocation_rows_train_adapters_exactly_in_the_units_they_name(
    allocation_run: dict[str, Any],
) -> None:
    results = allocation_run["results"]
    net = load_backbone(TINY_ALLOCATION.backbone)
    units = net.adaptable_units()
    third = math.floor(len(units) / 3 + 0.5)
    expected = {
        "none": set(),
        "shallow": set(units[:third]),
        "middle": set(units[third : len(units) - third]),
        "deep": set(units[len(units) - third :]),
        "all": set(units),
        allocation.LOWRANK_ROW: set(units),
    }
    expected["shallow+deep"] = expected["shallow"] | expected["deep"]
    for row, named in expected.items():
        assert set(results["row_info"][row]["units"]) == named, row
        assert select_units(results["row_info"][row]["config"]["allocation"], units) == named
        tensors = allocation_run["trained"][row]
        # The initial tensors of the same row: same config, same seed as the study drew them with.
        torch.manual_seed(TINY_ALLOCATION.seed)
        cfg = allocation.row_config(net, row, results["lowrank_rank"])
        net.add_domain("init", cfg, 10)
        initial = _snapshot(net, "init")
        net.remove_domain("init")
        assert set(initial) == set(tensors)
        adapted = {k.rsplit(".adapter.", 1)[0] for k in tensors if ".adapter." in k}
        assert adapted == named, row
        for k in tensors:
            if ".adapter." in k:  # every named adapter really trained (they start at zero: U or W)
                assert not torch.equal(tensors[k], initial[k]), f"{row}: {k} did not train"
        # Shared weights are bit-identical after every row (the fingerprint was taken before any training).
        assert allocation_run["shared_after"][row] == results["backbone"]["fingerprint"], row


def test_allocation_resumes_without_redoing_finished_rows(
    allocation_run: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "alloc.json"
    calls: list[str] = []

    def stop_after_three(net: MultiDomainNet, domain: str, row: dict[str, Any]) -> None:
        calls.append(row["row"])
        if len(calls) == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        allocation.run_allocation(TINY_ALLOCATION, out, log=_quiet, after_row=stop_after_three)
    saved = json.loads(out.read_text())
    assert list(saved["rows"]) == ["digits/none", "digits/shallow"]  # the third row never finished
    again: list[str] = []
    logs: list[str] = []
    results = allocation.run_allocation(
        TINY_ALLOCATION, out, log=logs.append, after_row=lambda n, d, r: again.append(r["row"])
    )
    assert again == list(allocation.ROWS[2:])
    assert any("2 finished rows kept" in line for line in logs)
    reference = allocation_run["results"]["rows"]
    assert {k: r["test_accuracy"] for k, r in results["rows"].items()} == {
        k: r["test_accuracy"] for k, r in reference.items()
    }


def test_a_results_file_of_other_settings_is_refused(allocation_run: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "alloc.json"
    out.write_text(allocation_run["path"].read_text())
    changed = replace(TINY_ALLOCATION, epochs=2)
    with pytest.raises(StudyError, match="other settings"):
        allocation.run_allocation(changed, out, log=_quiet)
    out.write_text("{not json")
    with pytest.raises(StudyError, match="cannot read results file"):
        allocation.run_allocation(TINY_ALLOCATION, out, log=_quiet)


def test_unknown_rows_and_backbones_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown allocation rows"):
        allocation.run_allocation(
            replace(TINY_ALLOCATION, rows=["sideways"]), tmp_path / "a.json", log=_quiet
        )
    with pytest.raises(BackboneSpecError, match="unknown backbone"):
        load_backbone("no-such-net")


# -- transfer -------------------------------------------------------------------------------------------------


def test_schedule_gives_small_sets_enough_steps() -> None:
    s = TransferSettings(backbone="x", input_size=16, domains=[], min_steps=60, min_epochs=4, max_epochs=60)
    assert schedule(50, 32, s) == 30  # 2 steps per epoch -> 30 epochs = 60 steps
    assert schedule(200, 32, s) == 9  # 7 steps per epoch -> 9 epochs = 63 steps
    assert schedule(2000, 32, s) == 4  # min_epochs
    assert schedule(10, 10, s) == 60  # capped at max_epochs


def test_transfer_table_shape_seeds_and_parameters(tmp_path: Path) -> None:
    seen: dict[str, int] = {}
    fingerprints: list[str] = []

    def after_row(net: MultiDomainNet, domain: str, row: dict[str, Any]) -> None:
        trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
        seen[f"{row['method']}/{row['size']}/{row['seed']}"] = trainable
        if row["method"] != "finetune":  # fine-tuning trains a copy; the served backbone never changes
            fingerprints.append(net.fingerprint())

    results = transfer.run_transfer(TINY_TRANSFER, tmp_path / "t.json", log=_quiet, after_row=after_row)
    # sizes [2, all]: 2 per class gets 2 seeds, all gets 1; 4 methods each.
    assert len(results["rows"]) == (2 + 1) * len(transfer.METHODS)
    assert fingerprints and set(fingerprints) == {results["backbone"]["fingerprint"]}
    cells = transfer.cells(results)["digits"]
    assert list(cells) == ["2", ALL]
    for method in transfer.METHODS:
        small, full = cells["2"][method], cells[ALL][method]
        assert small.n == 2 and full.n == 1 and small.images_per_class == 2 and full.images_per_class == 8
        assert small.mean == pytest.approx(sum(small.values) / 2)
        assert small.std == pytest.approx(abs(small.values[0] - small.values[1]) / math.sqrt(2))
    for key, row in results["rows"].items():
        assert row["train_images"] == 10 * row["images_per_class"], key
    net = load_backbone(TINY_TRANSFER.backbone)
    parallel = net.domain_parameter_counts(AdapterConfig(kind="parallel"), 10)
    lowrank = net.domain_parameter_counts(AdapterConfig(kind="lowrank", rank=TINY_TRANSFER.rank), 10)
    assert (
        results["method_parameters"]["parallel"]["trained_per_domain"] == parallel["adapter"] + parallel["bn"]
    )
    assert results["method_parameters"]["lowrank"]["trained_per_domain"] == lowrank["adapter"] + lowrank["bn"]
    assert results["method_parameters"]["finetune"]["trained_per_domain"] == net.shared_parameter_count
    # What each run really trained: head only = the head; finetune = everything (+ its own BN and head).
    assert seen["head/2/0"] == sum(net.domain_parameter_counts(AdapterConfig(kind="head"), 10).values())
    assert seen["parallel/2/0"] == sum(parallel.values())
    assert seen["finetune/all/0"] > net.shared_parameter_count
    md = transfer.markdown_table(results).splitlines()
    assert len(md) == 2 + 2 and "±" in md[2] and "±" not in md[3]


def test_subset_takes_exactly_per_class_and_differs_by_seed(tmp_path: Path) -> None:
    entry = DomainEntry("digits", "digits", train_per_class=8, val_per_class=3)
    data = entry.load(TINY_TRANSFER.input_size, TINY_TRANSFER.seed)
    a, b = subset(data, 3, 0), subset(data, 3, 1)
    assert torch.bincount(a.train.targets).tolist() == [3] * 10
    assert not torch.equal(a.train.images, b.train.images)
    assert a.val is data.val and a.test is data.test
    with pytest.raises(ValueError, match="smallest class has 8"):
        subset(data, 9, 0)


# -- CLI ------------------------------------------------------------------------------------------------------


def test_cli_writes_table_json_and_plot_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "alloc"
    argv = ["allocation", "--preset", "tiny", "--out", str(out), "--rows", "none,deep"]
    assert main(argv) == 0
    for suffix in (".md", ".json", ".png"):
        assert out.with_suffix(suffix).stat().st_size > 0
    results = json.loads(out.with_suffix(".json").read_text())
    assert list(results["rows"]) == ["digits/none", "digits/deep"]
    assert results["command"].startswith("multidomain train allocation --preset tiny")
    md = out.with_suffix(".md").read_text()
    assert "| deep third |" in md and "alloc.png" in md
    capsys.readouterr()
    assert main(argv) == 0  # everything done: nothing retrained
    assert "[1/2]" not in capsys.readouterr().err
    assert main([*argv[:-1], "none,all"]) == 2  # other settings, same file
    assert "other settings" in capsys.readouterr().err


def test_cli_allocation_over_seeds_on_a_subset_of_domains(tmp_path: Path) -> None:
    out = tmp_path / "seeds"
    argv = ["allocation", "--preset", "tiny", "--out", str(out), "--rows", "none", "--seeds", "2"]
    assert main([*argv, "--domains", "digits"]) == 0
    results = json.loads(out.with_suffix(".json").read_text())
    assert list(results["rows"]) == ["digits/none", "digits/none/seed1"]
    (row,) = allocation.table(results)
    runs = [results["rows"][k]["test_accuracy"] for k in ("digits/none", "digits/none/seed1")]
    assert row["accuracy"]["digits"] == pytest.approx(sum(runs) / 2) and row["seeds"] == {"digits": 2}
    assert row["std"]["digits"] == pytest.approx(abs(runs[0] - runs[1]) / math.sqrt(2))
    assert "mean ± std over 2 seeds" in out.with_suffix(".md").read_text()
    assert main([*argv, "--domains", "nope"]) == 2


def test_percent_of_backbone_leaves_an_imported_classifier_out(tmp_path: Path) -> None:
    from training.experiment import body_parameter_count

    net = load_backbone("resnet26:0.125")
    assert body_parameter_count(net) == net.shared_parameter_count  # no imported classifier: the same
    out = tmp_path / "alloc"
    assert main(["allocation", "--preset", "tiny", "--out", str(out), "--rows", "all"]) == 0
    results = json.loads(out.with_suffix(".json").read_text())
    info = results["row_info"]["all"]
    assert info["adapter_percent_of_backbone"] == pytest.approx(
        100 * info["adapter_parameters"] / results["backbone"]["shared_parameters"]
    )


def test_cli_transfer_and_its_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tr"
    assert main(["transfer", "--preset", "tiny", "--out", str(out), "--methods", "head,parallel"]) == 0
    assert out.with_suffix(".png").stat().st_size > 0
    assert "| digits | 2 | 2 |" in out.with_suffix(".md").read_text()
    assert main(["transfer", "--preset", "tiny", "--out", str(tmp_path / "x"), "--sizes", "5,zero"]) == 2
    assert "bad size 'zero'" in capsys.readouterr().err
    assert main(["transfer", "--preset", "tiny", "--out", str(tmp_path / "y"), "--backbone", "nope"]) == 2
    assert "unknown backbone 'nope'" in capsys.readouterr().err
    missing = tmp_path / "no-such-folder"
    assert main(["allocation", "--preset", "tiny", "--out", str(tmp_path / "z"), "--data", str(missing)]) == 2
    assert "no-such-folder" in capsys.readouterr().err


# -- the committed reading --------------------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_table_number_in_the_written_reading_is_in_the_committed_tables() -> None:
    """docs/studies.md quotes accuracies and percentages with two decimals, as the tables print them:
    each must appear in docs/allocation-mini.md or docs/transfer-mini.md (derived figures use other formats)."""
    import re

    reading = re.sub(r"`[^`]*`", "", (DOCS / "studies.md").read_text())  # settings and commands, not results
    tables = (DOCS / "allocation-mini.md").read_text() + (DOCS / "transfer-mini.md").read_text()
    table_numbers = set(re.findall(r"(?<![\d.])\d+\.\d\d(?![\d])", tables)) | set(
        re.findall(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d,])", tables)
    )
    quoted = set(re.findall(r"(?<![\d.])\d+\.\d\d(?![\d])", reading)) | set(
        re.findall(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d,])", reading)
    )
    assert len(quoted) > 40
    assert quoted - table_numbers == set()


def test_cli_runs_on_a_backbone_artifact_and_an_image_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Any backbone (an artifact directory) and any domain (an ImageFolder of PNGs) the package knows."""
    from PIL import Image

    from training import export

    net = load_backbone("resnet26:0.125")
    export.write_backbone_dir(backbone_artifact(net), tmp_path / "backbone")
    g = torch.Generator().manual_seed(0)
    for cls, level in (("dark", 60), ("light", 190)):
        (tmp_path / "shapes" / cls).mkdir(parents=True)
        for i in range(12):
            pixels = (torch.rand(20, 20, 3, generator=g) * 40 + level).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "shapes" / cls / f"{i}.png")
    out = tmp_path / "transfer"
    argv = ["transfer", "--preset", "tiny", "--out", str(out), "--backbone", str(tmp_path / "backbone")]
    argv += [
        "--data",
        str(tmp_path / "shapes"),
        "--input-size",
        "16",
        "--sizes",
        "3,all",
        "--methods",
        "head,lowrank",
    ]
    assert main(argv) == 0
    results = json.loads(out.with_suffix(".json").read_text())
    assert results["backbone"]["fingerprint"] == net.fingerprint()
    assert results["domains"]["shapes"]["classes"] == 2
    assert {(r["size"], r["method"]) for r in results["rows"].values()} == {
        (3, "head"),
        (3, "lowrank"),
        ("all", "head"),
        ("all", "lowrank"),
    }
    assert "--data" in results["command"] and "shapes" in results["command"]
    # Another backbone under the same results file is refused rather than mixed into the table.
    other = load_backbone("resnet26:0.125")
    with torch.no_grad():
        next(iter(other.shared_state_dict().values())).add_(1.0)
    export.write_backbone_dir(backbone_artifact(other), tmp_path / "backbone")
    capsys.readouterr()
    assert main(argv) == 2
    assert "written with another backbone" in capsys.readouterr().err
