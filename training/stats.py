"""Uncertainty of accuracies measured over a few training seeds and finite test sets (numpy only).

An accuracy measured here has two sources of noise: the *seed* (which images were drawn for training and
validation, the head's initialisation, the shuffling) and the *test images* (a finite sample of the
domain). With 3 seeds a bootstrap over seeds alone is degenerate (3 distinct values, at most 10 distinct
resamples), and a bootstrap over test images alone ignores the seed noise, which the decathlon's history
shows is the larger. ``hierarchical_bootstrap`` resamples both, in the order they were drawn:

    for each replicate b:
        draw K seeds from the K with replacement               (shared by every domain and every method)
        for each drawn seed and each domain:
            draw that seed's N test images with replacement    (shared by every method: a paired design)
        accuracy[b, method, domain] = mean over the drawn seeds of the drawn images' correctness

Every method is evaluated on the same drawn seeds and images in a replicate, so differences between methods
(of accuracies, or of a score built from them) are resampled as paired differences: the noise both share
cancels. Intervals are percentile intervals of the replicates.

Images are resampled by multinomial counts (how often each image is drawn), which turns the gather into one
matrix product per seed: exact in distribution, and fast enough for thousands of replicates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_REPLICATES = 2000
DEFAULT_LEVEL = 0.95

NOT_SETTLED = "not settled"


@dataclass(frozen=True)
class Summary:
    """A quantity measured once per seed and its interval."""

    estimate: float
    """The value on all seeds and all test images together."""
    mean: float
    """Mean of the per-seed values."""
    std: float
    """Sample standard deviation of the per-seed values (0 for one seed)."""
    low: float
    high: float
    """The percentile interval of the bootstrap replicates."""

    def to_dict(self) -> dict[str, float | list[float]]:
        return {
            "estimate": self.estimate,
            "mean": self.mean,
            "std": self.std,
            "interval": [self.low, self.high],
        }


def mean_std(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0.0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("no values")
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def percentile_interval(replicates: np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """The central ``level`` interval of ``replicates`` (1-D)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(np.asarray(replicates, dtype=np.float64), [tail, 100.0 - tail])
    return float(low), float(high)


def summarise(
    estimate: float,
    per_seed: Sequence[float] | np.ndarray,
    replicates: np.ndarray,
    level: float = DEFAULT_LEVEL,
) -> Summary:
    mean, std = mean_std(per_seed)
    low, high = percentile_interval(replicates, level)
    return Summary(float(estimate), mean, std, low, high)


def verdict(low: float, high: float, better: str, worse: str) -> str:
    """``better`` when the interval of a difference lies above 0, ``worse`` below, else "not settled"."""
    if low > 0.0:
        return better
    if high < 0.0:
        return worse
    return NOT_SETTLED


def hierarchical_bootstrap(
    correct: Mapping[str, Sequence[np.ndarray]],
    *,
    replicates: int = DEFAULT_REPLICATES,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Replicate accuracies: domain -> float [replicates, M], resampling seeds, then test images.

    ``correct[domain][k]`` is a bool [M, N_k] array: whether each of M methods got each of seed k's N_k
    test images right (the same images for every method; N_k may differ between seeds). Every domain has
    the same K seeds; the seed draw of a replicate is shared by all domains, the image draws by all methods.
    """
    domains = list(correct)
    if not domains:
        raise ValueError("no domains")
    n_seeds = len(correct[domains[0]])
    if n_seeds == 0 or any(len(correct[d]) != n_seeds for d in domains):
        raise ValueError("every domain needs the same (non-zero) number of seeds")
    methods = {np.asarray(a).shape[0] for d in domains for a in correct[d]}
    if len(methods) != 1:
        raise ValueError(f"every seed and domain needs the same methods, got counts {sorted(methods)}")
    (n_methods,) = methods
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_seeds, size=(replicates, n_seeds))  # [B, K] indices of the drawn seeds
    out: dict[str, np.ndarray] = {}
    for domain in domains:
        total = np.zeros((replicates, n_methods))
        for k, seed_correct in enumerate(correct[domain]):
            hits = np.asarray(seed_correct, dtype=np.float64)  # [M, N_k]
            n_images = hits.shape[1]
            if n_images == 0:
                raise ValueError(f"domain {domain!r}, seed {k}: no test images")
            chosen = draws == k  # [B, K]: where seed k was drawn
            times = int(chosen.sum())
            if times == 0:
                continue
            counts = rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=times)  # [times, N_k]
            accuracy = counts @ hits.T / n_images  # [times, M]
            rows = np.nonzero(chosen)[0]  # the replicate of each draw (a replicate may draw k twice)
            np.add.at(total, rows, accuracy)
        out[domain] = total / n_seeds
    return out
