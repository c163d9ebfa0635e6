"""Small statistics for the benchmarks: bootstrap confidence intervals over seeds and a ranking AUC.

Pure Python plus numpy; no model code.

- :func:`bootstrap_mean_ci`: percentile bootstrap CI of a mean (seeded resampling of the values).
- :func:`paired_diff_ci`: the same for the mean of paired differences ``a_i - b_i`` (e.g. a method
  minus SafeDPO on the same seed), which removes what the seed does to both runs alike.
- :func:`verdict`: "better" / "worse" / "no difference"; a CI that includes 0 is "no difference".
- :func:`auc`: how well a score ranks positives (e.g. hard categories) above negatives (easy ones),
  the Mann-Whitney formulation with ties counted 1/2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Bootstrap resamples and the resampling seed used by default.
B_DEFAULT = 10_000
SEED_DEFAULT = 0


@dataclass(frozen=True)
class CI:
    """A point estimate (the sample mean), its percentile-bootstrap interval and the sample size."""

    mean: float
    low: float
    high: float
    n: int
    level: float = 0.95

    def includes_zero(self) -> bool:
        return self.low <= 0.0 <= self.high

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n, "level": self.level}


def bootstrap_mean_ci(values: Sequence[float], *, b: int = B_DEFAULT, level: float = 0.95,
                      seed: int = SEED_DEFAULT) -> CI:
    """Percentile bootstrap ``level`` CI of the mean of ``values``.

    ``b`` resamples of size n drawn with replacement (``numpy.random.default_rng(seed)``, so the
    interval is reproducible); the bounds are the (1 - level)/2 and (1 + level)/2 quantiles of the
    resampled means (numpy's default linear interpolation). With one value, or all values equal,
    the interval collapses to that value.
    """
    xs = np.asarray([float(v) for v in values], dtype=np.float64)
    if xs.size == 0:
        raise ValueError("bootstrap_mean_ci needs at least one value")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if b < 1:
        raise ValueError(f"b must be >= 1, got {b}")
    mean = float(xs.mean())
    if xs.size == 1 or np.all(xs == xs[0]):
        return CI(mean, mean, mean, int(xs.size), level)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, xs.size, size=(b, xs.size))
    means = xs[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return CI(mean, float(low), float(high), int(xs.size), level)


def paired_diff_ci(a: Sequence[float], b_values: Sequence[float], *, b: int = B_DEFAULT, level: float = 0.95,
                   seed: int = SEED_DEFAULT) -> CI:
    """Bootstrap CI of the mean paired difference ``a_i - b_i`` (same seeds, same order)."""
    if len(a) != len(b_values):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b_values)}")
    return bootstrap_mean_ci([float(x) - float(y) for x, y in zip(a, b_values)], b=b, level=level, seed=seed)


def verdict(ci: CI, *, higher_is_better: bool = True) -> str:
    """``"better"`` when the whole CI lies on the good side of 0, ``"worse"`` on the bad side, else
    ``"no difference"`` (an interval that includes 0, its ends included)."""
    if ci.includes_zero():
        return "no difference"
    positive = ci.low > 0.0
    return "better" if positive == higher_is_better else "worse"


def auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """P(score of a random positive > score of a random negative) + 1/2 P(tie): the Mann-Whitney U
    statistic divided by n_pos * n_neg. 1 = every positive ranks above every negative, 0.5 = chance."""
    pos = [float(v) for v in positives]
    neg = [float(v) for v in negatives]
    if not pos or not neg:
        raise ValueError("auc needs at least one positive and one negative score")
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))
