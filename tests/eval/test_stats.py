"""catdpo_ray.eval.stats: bootstrap CIs, the verdict and the ranking AUC, against hand-computed values."""

from __future__ import annotations

import pytest

from catdpo_ray.eval.stats import CI, auc, bootstrap_mean_ci, paired_diff_ci, verdict


def test_ci_of_constant_values_collapses():
    ci = bootstrap_mean_ci([3.0, 3.0, 3.0])
    assert (ci.mean, ci.low, ci.high, ci.n) == (3.0, 3.0, 3.0, 3)
    assert bootstrap_mean_ci([7.5]) == CI(7.5, 7.5, 7.5, 1)


def test_ci_of_two_values_by_hand():
    # Resampling {0, 2} twice: means 0 (p=1/4), 1 (p=1/2), 2 (p=1/4). The 2.5 % quantile is 0 and the
    # 97.5 % quantile is 2 (each extreme holds 25 % of the mass, far more than 2.5 %).
    ci = bootstrap_mean_ci([0.0, 2.0])
    assert ci.mean == 1.0
    assert ci.low == 0.0 and ci.high == 2.0
    # A 40 % interval (quantiles 0.30 and 0.70) lies inside the middle atom: [1, 1].
    narrow = bootstrap_mean_ci([0.0, 2.0], level=0.4)
    assert narrow.low == 1.0 and narrow.high == 1.0


def test_ci_is_seeded_and_reproducible():
    xs = [1.0, 4.0, 2.0, 8.0, 5.0]
    assert bootstrap_mean_ci(xs) == bootstrap_mean_ci(xs)
    ci = bootstrap_mean_ci(xs)
    assert ci.mean == pytest.approx(4.0)
    assert min(xs) <= ci.low < ci.mean < ci.high <= max(xs)


def test_paired_differences_remove_the_shared_seed_effect():
    # Seed effects are huge (0, 50, 100) but a - b is exactly 2 on every seed: the CI is [2, 2].
    a = [2.0, 52.0, 102.0]
    b = [0.0, 50.0, 100.0]
    ci = paired_diff_ci(a, b)
    assert (ci.mean, ci.low, ci.high) == (2.0, 2.0, 2.0)
    assert verdict(ci) == "better"
    assert verdict(ci, higher_is_better=False) == "worse"
    with pytest.raises(ValueError):
        paired_diff_ci([1.0], [1.0, 2.0])


def test_paired_difference_by_hand():
    # Differences {-1, +3}: resampled means -1 (1/4), 1 (1/2), 3 (1/4) -> 95 % CI [-1, 3], includes 0.
    ci = paired_diff_ci([4.0, 6.0], [5.0, 3.0])
    assert ci.mean == 1.0 and ci.low == -1.0 and ci.high == 3.0
    assert verdict(ci) == "no difference"


def test_verdict_boundaries():
    assert verdict(CI(1.0, 0.0, 2.0, 5)) == "no difference"  # touches 0: includes it
    assert verdict(CI(-1.0, -2.0, 0.0, 5)) == "no difference"
    assert verdict(CI(-1.0, -2.0, -0.5, 5)) == "worse"
    assert verdict(CI(-1.0, -2.0, -0.5, 5), higher_is_better=False) == "better"


def test_auc_by_hand():
    assert auc([3, 4], [1, 2]) == 1.0
    assert auc([1, 2], [3, 4]) == 0.0
    assert auc([5, 5], [5, 5]) == 0.5
    # pairs (3,2)=1, (3,1)=1, (1,2)=0, (1,1)=0.5 -> 2.5 / 4
    assert auc([3, 1], [2, 1]) == 0.625
    # 9 hard vs 10 easy as in the bundled corpus: 8 hard above all easy, 1 hard below all -> 80/90
    assert auc([10] * 8 + [0], [1] * 10) == pytest.approx(80 / 90)
    with pytest.raises(ValueError):
        auc([], [1.0])


def test_input_validation():
    with pytest.raises(ValueError):
        bootstrap_mean_ci([])
    with pytest.raises(ValueError):
        bootstrap_mean_ci([1.0, 2.0], level=1.0)
