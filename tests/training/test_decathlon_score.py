"""The decathlon score reproduces the paper's numbers (DESIGN.md); the statistics and the verdicts of the
report follow from the per-image results, and the committed report's verdicts from its intervals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.decathlon import (
    MINI,
    claims,
    decathlon_score,
    encode_correct,
    rowset_statistics,
    score_array,
    write_report,
)
from training.stats import NOT_SETTLED, verdict

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "decathlon-mini.json"

DOMAINS = [
    "imagenet",
    "aircraft",
    "cifar100",
    "dped",
    "dtd",
    "gtsrb",
    "flowers",
    "omniglot",
    "svhn",
    "ucf101",
]
FINETUNE = [59.87, 60.34, 82.12, 92.82, 55.53, 97.53, 81.41, 87.69, 96.55, 51.20]
PARALLEL = [60.32, 64.21, 81.92, 94.73, 58.83, 99.38, 84.68, 89.21, 96.54, 50.94]


def _errors(accuracies: list[float]) -> dict[str, float]:
    return {d: 100.0 - a for d, a in zip(DOMAINS, accuracies, strict=True)}


def test_finetune_baseline_scores_2500() -> None:
    baseline = _errors(FINETUNE)
    assert decathlon_score(baseline, baseline) == pytest.approx(2500.0)


def test_parallel_adapters_score_3412() -> None:
    assert decathlon_score(_errors(PARALLEL), _errors(FINETUNE)) == pytest.approx(3412, abs=0.5)


def test_score_bounds_per_domain() -> None:
    baseline = {"a": 10.0}
    assert decathlon_score({"a": 0.0}, baseline) == pytest.approx(1000.0)  # perfect
    assert decathlon_score({"a": 20.0}, baseline) == 0.0  # twice the baseline's error
    assert decathlon_score({"a": 60.0}, baseline) == 0.0  # worse still: clipped, never negative
    assert decathlon_score({"a": 5.0}, baseline) == pytest.approx(1000 * (15 / 20) ** 2)


def test_the_array_score_is_the_dict_score() -> None:
    errors = np.array([_errors(PARALLEL)[d] for d in DOMAINS])
    e_max = 2 * np.array([_errors(FINETUNE)[d] for d in DOMAINS])
    assert float(score_array(errors, e_max)) == pytest.approx(
        decathlon_score(_errors(PARALLEL), _errors(FINETUNE))
    )
    stacked = score_array(np.stack([errors, e_max / 2]), e_max)  # leading axes are kept
    assert stacked.shape == (2,) and stacked[1] == pytest.approx(2500.0)
    assert float(score_array(np.array([3.0]), np.array([0.0]))) == 0.0  # a perfect baseline: nothing to beat


def _run(correct: np.ndarray, params: int = 100) -> dict:
    return {
        "test_images": int(correct.size),
        "test_accuracy": float(correct.mean()),
        "test_correct": encode_correct(correct),
        "domain_parameters": params,
        "head_parameters": 11,
    }


def _synthetic_runs(seeds: int = 3, n: int = 400) -> dict:
    """finetune right on 90% of the images, parallel on the same and 5% more, series on 80%, bn a copy of
    finetune: every difference is known in sign."""
    rng = np.random.default_rng(0)
    runs: dict = {}
    for s in range(seeds):
        runs[str(s)] = {}
        for d in ("a", "b"):
            u = rng.random(n)
            runs[str(s)][d] = {
                "finetune": _run(u < 0.9, 1000),
                "parallel": _run(u < 0.95, 100),
                "series": _run(u < 0.8, 150),
                "bn": _run(u < 0.9, 10),
            }
    return runs


def test_statistics_of_known_differences() -> None:
    stats = rowset_statistics(_synthetic_runs(), shared=1000, replicates=500)
    ft, par = stats["methods"]["finetune"], stats["methods"]["parallel"]
    for d in ("a", "b"):  # E_max is twice the seed-averaged fine-tune error, in %
        assert stats["e_max"][d] == pytest.approx(2 * 100 * (1 - ft["accuracy"][d]["estimate"]))
    assert ft["score"]["estimate"] == pytest.approx(500.0)  # 250 per domain against its own mean
    assert ft["params_multiplier"] == pytest.approx(2.0)  # N networks
    assert par["params_multiplier"] == pytest.approx(1.2)  # backbone + N domains
    assert par["head_parameters"] == {"a": 11, "b": 11}
    lo, hi = par["accuracy"]["a"]["interval"]
    assert lo <= par["accuracy"]["a"]["estimate"] <= hi
    by_pair = {(c["a"], c["b"]): c for c in stats["comparisons"]}
    assert by_pair[("parallel", "finetune")]["score"]["verdict"] == "parallel better"
    assert by_pair[("parallel", "series")]["mean_accuracy"]["verdict"] == "parallel better"
    assert by_pair[("series", "finetune")]["score"]["verdict"] == "finetune better"
    assert by_pair[("parallel", "bn")]["score"]["verdict"] == "parallel better"
    assert ("parallel+he", "parallel") not in by_pair  # rows that were not run are not compared


def test_identical_rows_are_not_settled_and_partial_seeds_are_refused() -> None:
    runs = _synthetic_runs()
    for seed in runs.values():
        for row in seed.values():
            row["parallel"] = row["finetune"]
    stats = rowset_statistics(runs, shared=1000, replicates=200)
    c = next(c for c in stats["comparisons"] if (c["a"], c["b"]) == ("parallel", "finetune"))
    assert c["score"]["interval"] == [0.0, 0.0] and c["score"]["verdict"] == NOT_SETTLED
    del runs["2"]["b"]["series"]
    with pytest.raises(ValueError, match="seed 2, domain b"):
        rowset_statistics(runs, shared=1000, replicates=200)


def _check_verdicts(results: dict) -> None:
    """Every verdict follows from its interval, and the claims say exactly those verdicts."""
    said = claims(results)
    for name, stats in results["rowsets"].items():
        for c in stats["comparisons"]:
            for quantity in ("score", "mean_accuracy"):
                q = c[quantity]
                assert q["verdict"] == verdict(*q["interval"], f"{c['a']} better", f"{c['b']} better")
            line = next(x for x in said if x.startswith(f"{name}: {c['what']} ({c['a']} vs {c['b']},"))
            assert f": {c['score']['verdict']}; mean accuracy" in line
            assert line.endswith(f": {c['mean_accuracy']['verdict']}.")


def test_report_renders_the_statistics_and_the_verdicts(tmp_path) -> None:
    from dataclasses import asdict

    from PIL import Image

    stats = rowset_statistics(_synthetic_runs(), shared=1000, replicates=200)
    results = {
        "preset": asdict(MINI),
        "seeds": 3,
        "bootstrap": {"replicates": 200, "level": 0.95, "method": "hierarchical"},
        "domains": {
            d: {"classes": 2, "train": 10, "val": 2, "test": 400, "description": d, "flip": False}
            for d in "ab"
        },
        "rowsets": {"rn": {"backbone": {"spec": "x", "shared_parameters": 1000}, "note": "", **stats}},
        "wall_seconds": 60.0,
        "machine": {
            "torch_threads": 1,
            "device": "cpu",
            "load_average_before": [1.0],
            "load_average_after": [2.0],
        },
    }
    results["claims"] = claims(results)
    _check_verdicts(results)
    md, js, png = write_report(results, tmp_path / "report", "multidomain train decathlon --preset mini")
    text = md.read_text()
    ft = stats["methods"]["finetune"]["mean_accuracy"]
    assert "| fine-tune (baseline) | 2.00x |" in text and f"{100 * ft['estimate']:.1f} ± " in text
    assert "rn: the bar (parallel's S above the fine-tune baseline's): met." in text
    assert json.loads(js.read_text())["rowsets"]["rn"]["e_max"] == stats["e_max"]
    assert Image.open(png).format == "PNG"


def test_the_committed_report_follows_from_its_runs() -> None:
    """docs/decathlon-mini.json: >= 3 seeds, >= 5 domains, a ResNet-26 row set; the statistics recomputed
    from its per-image results are the ones it reports, and every verdict follows from its interval."""
    results = json.loads(COMMITTED.read_text())
    assert results["seeds"] >= 3 and len(results["domains"]) >= 5
    assert {"mobilenet_v2", "resnet26"} <= set(results["rowsets"])
    assert {"parallel", "series", "bn", "head", "finetune"} <= set(results["rowsets"]["resnet26"]["methods"])
    for name, stats in results["rowsets"].items():
        again = rowset_statistics(
            results["runs"][name], stats["backbone"]["shared_parameters"], results["bootstrap"]["replicates"]
        )
        assert again["comparisons"] == stats["comparisons"] and again["e_max"] == stats["e_max"]
    _check_verdicts(results)
    assert results["claims"] == claims(results)
    md = COMMITTED.with_suffix(".md").read_text()
    assert all(c in md for c in results["claims"])


def test_series_at_parallels_budget_matches_its_parameter_count() -> None:
    from residual_adapters import create_backbone
    from training.decathlon import FAIRNESS_ROWS, PAPER_ROWS, _stored, row_adapter_config

    net = create_backbone("mobilenet_v2", classifier_domain=None)  # random weights: only shapes matter
    rows = PAPER_ROWS + FAIRNESS_ROWS
    parallel = _stored(net, row_adapter_config(net, rows[4], rows, 10), 10)
    paper_series = _stored(net, row_adapter_config(net, rows[3], rows, 10), 10)
    matched = _stored(net, row_adapter_config(net, FAIRNESS_ROWS[0], rows, 10), 10)
    assert paper_series > 2 * parallel  # the paper's sizes are far apart on MobileNetV2 ...
    assert parallel * 0.98 <= matched <= parallel  # ... the matched row is within 2% below


def test_he_init_draws_the_adapters_from_the_official_distribution() -> None:
    import torch

    from residual_adapters import AdapterConfig, create_backbone
    from training.decathlon import he_init_adapters

    net = create_backbone("resnet26", width=0.5, classifier_domain=None)
    net.add_domain("d", AdapterConfig(kind="parallel"), 3)
    weights = {k: v for k, v in net.domain_parameters("d").items() if k.endswith(".adapter.weight")}
    assert all(float(w.abs().max()) == 0.0 for w in weights.values())  # zero by default
    torch.manual_seed(0)
    he_init_adapters(net, "d")
    for w in weights.values():  # N(0, 2 / C_out): the sample std within 5 of its standard errors
        n, expected = w.numel(), (2.0 / w.shape[0]) ** 0.5
        assert abs(float(w.std()) - expected) <= 5 * expected / (2 * n) ** 0.5


def test_wall_time_counts_overlapping_invocations_once() -> None:
    from training.decathlon import _time_line

    sessions = [
        {"started": 0.0, "seconds": 600.0, "trained": 3, "load_average_start": 2.0, "load_average_now": 4.0},
        {
            "started": 300.0,
            "seconds": 600.0,
            "trained": 2,
            "load_average_start": 3.0,
            "load_average_now": 5.0,
        },
        {
            "started": 2000.0,
            "seconds": 60.0,
            "trained": 1,
            "load_average_start": 1.0,
            "load_average_now": 1.0,
        },
        {"started": 3000.0, "load_average_start": 1.0},  # report only: trained nothing
    ]
    line = _time_line(
        {"sessions": sessions, "wall_seconds": 5.0, "machine": {"torch_threads": 1, "device": "cpu"}}
    )
    assert line.startswith("Wall time: 16.0 min of training over 3 invocation(s) (6 runs trained)")
    assert "load average 1.0 to 5.0" in line
