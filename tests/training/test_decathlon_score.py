"""The decathlon score reproduces the paper's numbers from its accuracies (DESIGN.md)."""

from __future__ import annotations

import pytest

from training.decathlon import decathlon_score

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


def _fake_results() -> dict:
    from training.decathlon import METHODS, MethodResult

    accuracy = {
        "head": (0.80, 0.90),
        "bn": (0.90, 0.95),
        "finetune": (0.95, 0.90),
        "series": (0.94, 0.96),
        "parallel": (0.96, 0.97),
        "parallel+svd": (0.955, 0.97),
    }
    params = {"head": 0, "bn": 10, "finetune": 1000, "series": 150, "parallel": 100, "parallel+svd": 55}
    methods = {}
    for m in METHODS:
        r = MethodResult(m, accuracy=dict(zip(["a", "b"], accuracy[m], strict=True)))
        r.domain_parameters = {"a": params[m], "b": params[m]}
        methods[m] = r
    baseline = {d: 100 * (1 - a) for d, a in methods["finetune"].accuracy.items()}
    for r in methods.values():
        r.score = decathlon_score({d: 100 * (1 - a) for d, a in r.accuracy.items()}, baseline)
        r.mean_accuracy = sum(r.accuracy.values()) / 2
        r.params_multiplier = (1000 + sum(r.domain_parameters.values())) / 1000
    from dataclasses import asdict

    from training.decathlon import TINY

    domains = {
        d: {"classes": 10, "train": 500, "val": 100, "test": 100, "description": d, "flip": False}
        for d in "ab"
    }
    return {
        "preset": asdict(TINY),
        "backbone": {"name": "x", "shared_parameters": 1000, "fingerprint": "0" * 64},
        "domains": domains,
        "methods": {m: asdict(r) for m, r in methods.items()},
        "wall_seconds": 60.0,
        "cpu_seconds": 50.0,
        "machine": {"torch_threads": 1, "cpu": "x", "device": "cpu"},
    }


def test_report_has_the_table_the_claims_and_a_plot(tmp_path) -> None:
    import json

    from PIL import Image

    from training.decathlon import claims, write_report

    results = _fake_results()
    md, js, png = write_report(results, tmp_path / "report", "multidomain train decathlon --preset tiny")
    text = md.read_text()
    assert "| fine-tune (baseline) | 3.00x | 95.00 | 90.00 | 92.50 | 500 |" in text
    assert "| parallel adapters | 1.20x | 96.00 | 97.00 | 96.50 |" in text
    assert "`multidomain train decathlon --preset tiny`" in text
    assert json.loads(js.read_text())["methods"]["parallel"]["score"] > 500
    assert Image.open(png).format == "PNG"
    found = claims(results)
    assert any(c.startswith("Parallel adapters vs fine-tuning") and "(holds" in c for c in found)
    assert any("Parallel vs series" in c and ": holds." in c for c in found)
    assert any(c.startswith("Bar: the parallel row's S") for c in found)
