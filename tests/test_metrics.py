"""Tests of catdpo_ray.eval.metrics: hand-computed Macro / Worst-3 / Gap / Variance."""

from __future__ import annotations

import math

import pytest

from catdpo_ray.eval.metrics import balance_metrics, weakest


def test_balance_metrics_by_hand() -> None:
    """Scores (90, 80, 70, 60, 100):
    Macro    = 400 / 5 = 80
    Worst-3  = (60 + 70 + 80) / 3 = 70
    Gap      = 100 - 60 = 40
    Variance = fractions (0.9, 0.8, 0.7, 0.6, 1.0), mean 0.8, squared deviations
               (0.01, 0, 0.01, 0.04, 0.04), sum 0.10, / 5 = 0.02, x 1e3 = 20.
    """
    scores = {"a": 90.0, "b": 80.0, "c": 70.0, "d": 60.0, "e": 100.0}
    m = balance_metrics(scores)
    assert m["macro"] == pytest.approx(80.0)
    assert m["worst3"] == pytest.approx(70.0)
    assert m["gap"] == pytest.approx(40.0)
    assert m["variance"] == pytest.approx(20.0)
    assert m["num_categories"] == 5
    assert m["worst_categories"] == ["d", "c", "b", "a", "e"]
    assert m["per_category"] == scores and m["missing"] == []


def test_fewer_than_three_categories_worst3_is_mean_of_present() -> None:
    """Scores (50, 100): Worst-3 = Macro = 75; Gap 50; Variance: (0.25^2 + 0.25^2) / 2 = 0.0625 -> 62.5."""
    m = balance_metrics({"x": 50.0, "y": 100.0})
    assert m["worst3"] == pytest.approx(75.0) and m["macro"] == pytest.approx(75.0)
    assert m["gap"] == pytest.approx(50.0) and m["variance"] == pytest.approx(62.5)


def test_single_category() -> None:
    m = balance_metrics({"only": 42.0})
    assert (m["macro"], m["worst3"], m["gap"], m["variance"]) == (42.0, 42.0, 0.0, 0.0)


def test_missing_categories_are_excluded_and_listed() -> None:
    """None and NaN mean no test prompts: scores (20, 40, 60) remain -> Macro 40, Worst-3 40, Gap 40,
    Variance ((-0.2)^2 + 0 + 0.2^2) / 3 = 0.08 / 3 -> 80 / 3."""
    m = balance_metrics({"a": 20.0, "none": None, "b": 40.0, "nan": math.nan, "c": 60.0})
    assert m["missing"] == ["none", "nan"]
    assert m["per_category"] == {"a": 20.0, "b": 40.0, "c": 60.0}
    assert m["num_categories"] == 3
    assert m["macro"] == pytest.approx(40.0) and m["worst3"] == pytest.approx(40.0)
    assert m["gap"] == pytest.approx(40.0) and m["variance"] == pytest.approx(80.0 / 3)


@pytest.mark.parametrize("scores", [{}, {"a": None, "b": math.nan}])
def test_no_categories_gives_none(scores: dict) -> None:
    m = balance_metrics(scores)
    assert (m["macro"], m["worst3"], m["gap"], m["variance"]) == (None, None, None, None)
    assert m["num_categories"] == 0 and m["worst_categories"] == [] and m["missing"] == list(scores)


def test_weakest_orders_ascending_ties_by_name_and_skips_missing() -> None:
    scores = {"d": 10.0, "c": 30.0, "b": 10.0, "a": None, "e": 20.0}
    assert weakest(scores, n=3) == ["b", "d", "e"]
    assert weakest(scores) == ["b", "d", "e", "c"]


def test_infinite_score_is_rejected() -> None:
    with pytest.raises(ValueError, match="infinite"):
        balance_metrics({"a": math.inf})
