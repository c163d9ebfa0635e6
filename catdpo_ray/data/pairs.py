"""Pair construction (METHOD.md section 1): normalised rows -> category-tagged preference pairs.

Let (y_w, y_l) be the helpfulness pair (``better_response_id``) and h = 1 for an unsafe response.

======================  ==========================================================  ===============
mode                    rule                                                        used by
======================  ==========================================================  ===============
``helpful``             (better, worse)                                             DPO-helpful
``harmless``            (safer, less safe)                                          DPO-harmless
``safe_better``         helpful pair, kept only if y_w is safe                      DPO-SafeBetter
``safety_aware``        helpful pair; h_w=1,h_l=0 -> swap; h_w=h_l=1 -> drop       SafeDPO, Cat-DPO
======================  ==========================================================  ===============

Every pair carries ``safety_gap`` g = 1 iff chosen is safe and rejected unsafe, and the
category set C = union of both responses' flagged categories, as a multi-hot list.
Dropped pairs are counted per reason, never silently lost.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from catdpo_ray.data.schema import NormalizedRow

#: A pair record as it enters Ray Data (one dict per pair).
PAIR_FIELDS: tuple[str, ...] = (
    "pair_id",
    "prompt",
    "chosen",
    "rejected",
    "chosen_safe",
    "rejected_safe",
    "safety_gap",
    "categories",
)

# Each rule maps a row to (chosen index, outcome) or (None, drop reason).
Rule = Callable[[NormalizedRow], tuple[int | None, str]]


def _helpful(row: NormalizedRow) -> tuple[int | None, str]:
    return row.better, "kept"


def _harmless(row: NormalizedRow) -> tuple[int | None, str]:
    return row.safer, "kept"


def _safe_better(row: NormalizedRow) -> tuple[int | None, str]:
    if not row.safe[row.better]:
        return None, "dropped:chosen_unsafe"
    return row.better, "kept"


def _safety_aware(row: NormalizedRow) -> tuple[int | None, str]:
    w, lose = row.better, 1 - row.better
    unsafe_w, unsafe_l = not row.safe[w], not row.safe[lose]
    if unsafe_w and unsafe_l:
        return None, "dropped:both_unsafe"
    if unsafe_w:
        return lose, "swapped"
    return w, "kept"


PAIR_RULES: dict[str, Rule] = {
    "helpful": _helpful,
    "harmless": _harmless,
    "safe_better": _safe_better,
    "safety_aware": _safety_aware,
}


def make_pair(row: NormalizedRow, chosen: int, *, pair_id: str, num_categories: int) -> dict[str, Any]:
    """The pair record with ``chosen`` (0 or 1) as the preferred response."""
    rejected = 1 - chosen
    cats = row.categories[0] | row.categories[1]
    multi_hot = [0] * num_categories
    for k in cats:
        multi_hot[k] = 1
    return {
        "pair_id": pair_id,
        "prompt": row.prompt,
        "chosen": row.responses[chosen],
        "rejected": row.responses[rejected],
        "chosen_safe": row.safe[chosen],
        "rejected_safe": row.safe[rejected],
        "safety_gap": int(row.safe[chosen] and not row.safe[rejected]),
        "categories": multi_hot,
    }


def construct_pair(
    row: NormalizedRow, mode: str, *, pair_id: str, num_categories: int
) -> tuple[dict[str, Any] | None, str]:
    """Apply pair rule ``mode`` to one row: (pair or None, outcome such as ``kept`` or ``dropped:both_unsafe``)."""
    try:
        rule = PAIR_RULES[mode]
    except KeyError:
        raise ValueError(f"unknown pair mode {mode!r}; choose one of {sorted(PAIR_RULES)}") from None
    chosen, outcome = rule(row)
    if chosen is None:
        return None, outcome
    return make_pair(row, chosen, pair_id=pair_id, num_categories=num_categories), outcome


def pair_summary(pairs: list[dict[str, Any]], categories: list[str]) -> dict[str, dict[str, int]]:
    """Per-category counts of pairs and safety-gap pairs (for the printed data summary)."""
    total: Counter[int] = Counter()
    gap: Counter[int] = Counter()
    for p in pairs:
        for k, flag in enumerate(p["categories"]):
            if flag:
                total[k] += 1
                gap[k] += int(p["safety_gap"])
    return {name: {"pairs": total[k], "safety_gap_pairs": gap[k]} for k, name in enumerate(categories)}
