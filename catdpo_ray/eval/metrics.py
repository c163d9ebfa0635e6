"""Category-balance metrics over per-category scores (METHOD.md section 6). Pure python.

A score s_k is a percentage: the safe ratio on category-k test prompts, or offline the preference
accuracy on category-k safety-gap test pairs. A category with no test prompts has no score
(None or NaN): it is left out of every aggregate and listed under ``missing``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def _present(scores: Mapping[str, float | None]) -> dict[str, float]:
    """Scores with a value, as floats; None and NaN mean "no test prompts for this category"."""
    present: dict[str, float] = {}
    for name, score in scores.items():
        if score is None or math.isnan(float(score)):
            continue
        if math.isinf(float(score)):
            raise ValueError(f"score of category {name!r} is infinite")
        present[name] = float(score)
    return present


def _ascending(present: Mapping[str, float]) -> list[str]:
    """Category names from lowest to highest score; ties broken by name for determinism."""
    return sorted(present, key=lambda name: (present[name], name))


def balance_metrics(scores: Mapping[str, float | None]) -> dict[str, Any]:
    """Macro, Worst-3, Gap and Variance of per-category scores (Cat-DPO, arXiv 2604.17299).

    Over the K categories with a score:

    - ``macro``: unweighted mean of s_k;
    - ``worst3``: mean of the three lowest s_k (fewer than three present: mean of all present);
    - ``gap``: max s_k - min s_k, in percentage points;
    - ``variance``: population variance of s_k / 100, times 10^3.

    Args:
        scores: category name -> score in percent, or None/NaN when the category has no test prompts.

    Returns:
        ``{"per_category": {name: score}, "macro", "worst3", "gap", "variance", "num_categories",
        "worst_categories": [names, ascending by score], "missing": [names without a score]}``.
        With no scored category the four aggregates are None.
    """
    present = _present(scores)
    missing = [name for name in scores if name not in present]
    ordered = _ascending(present)
    result: dict[str, Any] = {
        "per_category": dict(present),
        "macro": None,
        "worst3": None,
        "gap": None,
        "variance": None,
        "num_categories": len(present),
        "worst_categories": ordered,
        "missing": missing,
    }
    if not present:
        return result
    values = list(present.values())
    k = len(values)
    lowest = [present[name] for name in ordered[:3]]
    fractions = [v / 100.0 for v in values]
    mean_fraction = sum(fractions) / k
    result["macro"] = sum(values) / k
    result["worst3"] = sum(lowest) / len(lowest)
    result["gap"] = max(values) - min(values)
    result["variance"] = 1e3 * sum((f - mean_fraction) ** 2 for f in fractions) / k
    return result


def weakest(scores: Mapping[str, float | None], n: int = 8) -> list[str]:
    """The ``n`` lowest-scoring categories with a score, lowest first (ties by name)."""
    return _ascending(_present(scores))[:n]
