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
