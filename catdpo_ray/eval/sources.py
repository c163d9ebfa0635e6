"""Score sources of evaluation reports: which per-category scores a report or run holds, and their labels.

A *score source* is one way of scoring every category (percent per category, with the balance
metrics of :func:`catdpo_ray.eval.metrics.balance_metrics`):

- ``preference:likelihood`` / ``preference:implicit`` / ``preference:ref_likelihood``: held-out
  preference accuracy (policy likelihood, implicit reward, reference likelihood = "before");
- ``judge:<name>`` and ``judge:<name>:fluent``: safe (and safe-and-fluent) ratio under a judge.

Shared by the report and comparison tables (:mod:`catdpo_ray.eval.compare`) and the plots
(:mod:`catdpo_ray.eval.panels`); it imports neither.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from catdpo_ray.eval.metrics import balance_metrics

#: Score source key -> human label (tables, plot titles).
SOURCE_LABELS: dict[str, str] = {
    "preference:likelihood": "preference accuracy, policy likelihood",
    "preference:implicit": "preference accuracy, implicit reward",
    "preference:ref_likelihood": "preference accuracy, reference likelihood (before)",
}


def source_label(key: str) -> str:
    """``judge:rule`` -> ``safe ratio, rule judge``; ``judge:rule:fluent`` -> ``safe & fluent ratio, rule
    judge``; preference keys from :data:`SOURCE_LABELS`."""
    parts = key.split(":")
    if parts[0] == "judge":
        return f"{'safe & fluent' if parts[-1] == 'fluent' else 'safe'} ratio, {parts[1]} judge"
    return SOURCE_LABELS.get(key, key)


def preference_block(row: Mapping[str, Any]) -> dict[str, Any]:
    """An ``eval_row`` (``catdpo_ray.eval.preference``) -> the report's ``preference`` section.

    Returns:
        ``{"safety_gap_pairs": {category: n}, "likelihood"|"implicit"|"ref_likelihood":
        balance_metrics(...), "helpfulness": {"implicit", "likelihood", "ref_likelihood"}}``; the
        helpfulness entries are accuracies (percent) on held-out both-safe pairs.
    """
    per = row["per_category"]
    block: dict[str, Any] = {"safety_gap_pairs": {c: int(e["n"]) for c, e in per.items()}}
    for key in ("likelihood", "implicit", "ref_likelihood"):
        block[key] = balance_metrics({c: e.get(key) for c, e in per.items()})
    block["helpfulness"] = {
        "implicit": row.get("eval/helpful_acc"),
        "likelihood": row.get("eval/helpful_likelihood_acc"),
        "ref_likelihood": row.get("eval/ref_helpful_likelihood_acc"),
    }
    return block


def sources_of(report: Mapping[str, Any] | None, final_eval: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Score source key -> balance metrics (with ``per_category``), from a report and/or a final_eval row."""
    sources: dict[str, dict[str, Any]] = {}
    pref = preference_block(final_eval) if final_eval else (report or {}).get("preference")
    for key in ("likelihood", "implicit", "ref_likelihood"):
        if pref and pref.get(key):
            sources[f"preference:{key}"] = pref[key]
    for name, block in ((report or {}).get("judges") or {}).items():
        sources[f"judge:{name}"] = block
        if block.get("safe_fluent"):
            sources[f"judge:{name}:fluent"] = block["safe_fluent"]
    return sources


def report_sources(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Score sources of one eval ``report.json``: its judges, then its preference blocks that scored a category."""
    sources = sources_of({"judges": report["judges"]}, None)
    for key, block in sources_of({"preference": report["preference"]}, None).items():
        if block["num_categories"]:
            sources[key] = block
    return sources
