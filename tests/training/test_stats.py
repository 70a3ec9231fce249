"""The interval code against cases with a known answer (training/stats.py).

Bootstrap replicates are random: every tolerance below is several Monte Carlo standard errors of the
quantity checked (B replicates: a standard deviation's relative error is about 1/sqrt(2B), a quantile's
sqrt(q(1-q)/B)/density), plus the 1/N granularity of an accuracy on N images.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from training.stats import (
    NOT_SETTLED,
    hierarchical_bootstrap,
    mean_std,
    percentile_interval,
    summarise,
    verdict,
)

B = 20_000


def _hits(n: int, correct: int) -> np.ndarray:
    """A bool [n] array with ``correct`` True values."""
    out = np.zeros(n, dtype=bool)
    out[:correct] = True
    return out


def test_one_seed_is_the_binomial_proportion_interval() -> None:
    n, p = 400, 0.9
    boot = hierarchical_bootstrap({"d": [_hits(n, round(p * n))[None]]}, replicates=B)["d"][:, 0]
    sigma = math.sqrt(p * (1 - p) / n)
    # The image bootstrap of one seed is Binomial(n, p) / n exactly: its std and its quantiles.
    assert boot.std() == pytest.approx(sigma, rel=0.03)
    low, high = percentile_interval(boot)
    exact_low, exact_high = (scipy_stats.binom.ppf(q, n, p) / n for q in (0.025, 0.975))
    assert abs(low - exact_low) <= 1.5 / n and abs(high - exact_high) <= 1.5 / n
    # ... and it agrees with the Wilson score interval to within the discreteness of n images.
    z = 1.959964
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert abs(low - (centre - half)) <= 3 / n and abs(high - (centre + half)) <= 3 / n


def test_several_seeds_have_the_variance_of_the_two_stage_draw() -> None:
    """Var = (between-seed variance + mean within-seed binomial variance) / K, both population forms."""
    n = 200
    rates = np.array([0.6, 0.7, 0.8, 0.85, 0.9])
    k = len(rates)
    seeds = [_hits(n, round(r * n))[None] for r in rates]
    boot = hierarchical_bootstrap({"d": seeds}, replicates=B, seed=1)["d"][:, 0]
    expected = (rates.var() + np.mean(rates * (1 - rates) / n)) / k
    assert boot.mean() == pytest.approx(rates.mean(), abs=4 * math.sqrt(expected / B))
    assert boot.std() == pytest.approx(math.sqrt(expected), rel=0.04)


def test_the_seed_draw_is_shared_by_every_domain() -> None:
    """Seeds whose test images are all right or all wrong have no within-seed noise: two domains with the
    same per-seed pattern must then have identical replicates, which only a shared seed draw gives."""
    pattern = [True, False, True, True]
    seeds = [np.full((1, 50), hit) for hit in pattern]
    boot = hierarchical_bootstrap({"a": seeds, "b": [s[:, :30] for s in seeds]}, replicates=500)
    assert np.array_equal(boot["a"], boot["b"])
    assert len(np.unique(boot["a"])) > 1  # and the seeds are resampled at all


def test_methods_are_paired_on_the_same_images() -> None:
    rng = np.random.default_rng(0)
    seeds = []
    for _ in range(3):
        base = rng.random(300) < 0.8
        better = base | (rng.random(300) < 0.5)  # right wherever base is, and more
        seeds.append(np.stack([base, base, better]))
    boot = hierarchical_bootstrap({"d": seeds}, replicates=2000)["d"]
    assert np.array_equal(boot[:, 0], boot[:, 1])  # the same method twice: no difference, ever
    assert (boot[:, 2] >= boot[:, 0]).all()  # a superset of right answers is never behind in a replicate


def test_summary_verdicts_and_helpers() -> None:
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)
    assert percentile_interval(np.arange(101.0), 0.9) == pytest.approx((5.0, 95.0))
    s = summarise(0.5, [0.4, 0.6], np.linspace(0, 1, 101))
    assert s.to_dict() == {"estimate": 0.5, "mean": 0.5, "std": pytest.approx(0.1414, abs=1e-4),
                           "interval": pytest.approx([0.025, 0.975])}  # fmt: skip
    assert verdict(0.1, 2.0, "a", "b") == "a"
    assert verdict(-2.0, -0.1, "a", "b") == "b"
    assert verdict(-0.1, 2.0, "a", "b") == NOT_SETTLED
    assert verdict(0.0, 0.0, "a", "b") == NOT_SETTLED  # no difference at all settles nothing either


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="same"):
        hierarchical_bootstrap({"a": [np.ones((1, 4), bool)], "b": [np.ones((1, 4), bool)] * 2})
    with pytest.raises(ValueError, match="methods"):
        hierarchical_bootstrap({"a": [np.ones((1, 4), bool)], "b": [np.ones((2, 4), bool)]})
    with pytest.raises(ValueError, match="no test images"):
        hierarchical_bootstrap({"a": [np.ones((1, 0), bool)]})
    with pytest.raises(ValueError, match="level"):
        percentile_interval(np.ones(3), 1.0)
    with pytest.raises(ValueError, match="no values"):
        mean_std([])
