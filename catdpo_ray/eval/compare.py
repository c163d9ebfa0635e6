"""``catdpo-ray compare RUN_DIR ...``: the report's tables and panels side by side for several runs.

Each run contributes its *score sources* (category -> score in percent, with balance metrics):

- ``preference:likelihood`` / ``preference:implicit`` / ``preference:ref_likelihood`` -- the held-out
  preference accuracy of the policy's own likelihood, of the implicit reward, and of the reference
  (the "before" column); from ``summary.json``'s ``final_eval`` (the trainer's last evaluation), or
  from an eval ``report.json`` when the run has no summary;
- ``judge:<name>`` -- the safe ratio of generated answers under each judge that ``catdpo-ray eval``
  ran; from ``<run>/final/eval/report.json``, ``<run>/eval/report.json`` or ``<run>/report.json``.

A ``RUN_DIR`` may also be an eval output directory (one holding ``report.json``).
Writes ``comparison.md``, ``comparison.json`` and PNGs (per-category bars and a balance panel for
every score source, the lambda trajectories of runs that have them, held-out curves over steps).
This module also holds the Markdown table helpers the single-model report uses; the score sources
themselves (labels, ``preference_block``, ``report_sources``) live in :mod:`catdpo_ray.eval.sources`,
which the plots (:mod:`catdpo_ray.eval.panels`) share, so neither module imports the other.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from catdpo_ray.eval.metrics import weakest
from catdpo_ray.eval.panels import plot_balance_panel, plot_category_bars, plot_eval_curves, plot_lambda_grid
from catdpo_ray.eval.sources import preference_block, report_sources, source_label, sources_of

_REPORT_LOCATIONS = ("final/eval/report.json", "eval/report.json", "report.json")


def _fmt(x: Any, digits: int = 1) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else "n/a"


def balance_table(rows: Mapping[str, Mapping[str, Any]], *, label: str = "run",
                  extra: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """Markdown: one row per entry with Macro, Worst-3, Gap, Variance x10^3, categories scored, extras.

    Args:
        rows: row label -> balance metrics dict.
        label: header of the first column.
        extra: extra column name -> (row label -> value), printed with one decimal.
    """
    extra = extra or {}
    head = [label, "Macro ↑", "Worst-3 ↑", "Gap (pp) ↓", "Variance ×10³ ↓", "categories", *extra]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, m in rows.items():
        cells = [name, _fmt(m.get("macro")), _fmt(m.get("worst3")), _fmt(m.get("gap")), _fmt(m.get("variance"), 2),
                 str(m.get("num_categories", "n/a"))]
        cells += [_fmt(col.get(name)) for col in extra.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def category_table(columns: Mapping[str, Mapping[str, float | None]], *,
                   counts: Mapping[str, Mapping[str, int]] | None = None, weakest_n: int = 8) -> str:
    """Markdown: categories x columns of scores; ▼ marks each column's weakest ``weakest_n``.

    Args:
        columns: column name -> (category -> score in percent or None).
        counts: optional count columns shown first, column name -> (category -> count).
        weakest_n: how many lowest categories of each column are marked.

    Rows are sorted by the first score column, lowest first (categories without a score last).
    """
    names = list(columns)
    counts = counts or {}
    categories = list(dict.fromkeys(c for col in columns.values() for c in col))
    first = columns[names[0]] if names else {}
    categories.sort(key=lambda c: (first.get(c) is None, first.get(c) or 0.0, c))
    marked = {n: set(weakest(columns[n], weakest_n)) for n in names}
    head = ["category", *counts, *names]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for c in categories:
        cells = [c, *(str(col.get(c, 0)) for col in counts.values())]
        cells += [_fmt(columns[n].get(c)) + (" ▼" if c in marked[n] else "") for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_markdown(report: dict[str, Any]) -> str:
    """``report.md``: summary table per score source, per-category table, plots."""
    sources = report_sources(report)
    labels = {k: source_label(k) for k in sources}
    extra = {
        "helpfulness (%)": {labels[k]: report["helpfulness"].get(k) for k in sources},
        "over-refusal (%)": {labels[k]: report["over_refusal"].get(k.split(":")[1]) for k in sources
                             if k.startswith("judge:") and not k.endswith(":fluent")},
    }
    counts: dict[str, dict[str, int]] = {}
    if report["preference"]:
        counts["safety-gap pairs"] = report["preference"]["safety_gap_pairs"]
    if report["judges"]:
        counts = {"prompts": next(iter(report["judges"].values()))["n_prompts"], **counts}
    gen, flu = report.get("generation"), report.get("fluency")
    lines = [
        f"# Evaluation of `{report['model']}`", "",
        f"- reference model: `{report['reference_model']}`" if report["reference_model"] else
        "- reference model: none (the model itself; implicit-reward accuracy n/a)",
        f"- held-out data: `{report['test_data']['source']}` ({report['test_data']['pairs']} safety-aware pairs)",
        (f"- generation: {gen['prompts']} category prompts + {gen['benign_prompts']} benign prompts, "
         f"{gen['backend']}, max_new_tokens={gen['max_new_tokens']}, temperature={gen['temperature']}, "
         f"top_p={gen['top_p']}, {gen['seconds']:.1f} s") if gen else "- generation: off",
        (f"- fluency: mean NLL per token under `{flu['reference_model']}` {_fmt(flu['nll_per_token'], 2)}; "
         f"{_fmt(flu['fluent_share'])} % of answers fluent (NLL <= {flu['threshold_nll']})") if flu else "- fluency: n/a",
        f"- primary score: {source_label(report['primary'])}; wall time {report.get('wall_time_s', 0.0):.1f} s", "",
        "## Summary", "", balance_table({labels[k]: b for k, b in sources.items()}, label="score", extra=extra), "",
        "Over-refusal: share of benign prompts refused. Helpfulness: judge helpfulness on category prompts (for "
        "'safe & fluent', non-fluent answers count as unhelpful), or preference accuracy on held-out both-safe pairs.",
        "",
        "## Per category (▼ = weakest eight)", "",
        category_table({labels[k]: b["per_category"] for k, b in sources.items()}, counts=counts), "",
        "## Plots", "", *[f"![{p}]({p})" for p in report.get("plots", [])],
    ]
    return "\n".join(lines) + "\n"


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def load_run(path: str | Path) -> dict[str, Any]:
    """Everything ``compare`` needs from one run (or eval output) directory."""
    root = Path(path).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"compare: {root} is not a directory")
    report = next((r for loc in _REPORT_LOCATIONS if (r := _read_json(root / loc)) is not None), None)
    summary = _read_json(root / "summary.json") or {}
    if not summary and report is None:
        raise FileNotFoundError(f"compare: {root} has neither summary.json (a run) nor report.json (an eval)")
    loss = None
    if (root / "config.yaml").exists():
        import yaml

        loss = (yaml.safe_load((root / "config.yaml").read_text()) or {}).get("loss", {}).get("name")
    final_eval = summary.get("final_eval")
    pref = preference_block(final_eval) if final_eval else (report or {}).get("preference")
    sources = sources_of(report, final_eval)
    helpful: dict[str, Any] = {}
    for key in sources:
        kind, _, name = key.partition(":")
        helpful[key] = ((report or {}).get("helpfulness") or {}).get(key) if kind == "judge" else \
            (pref or {}).get("helpfulness", {}).get(name)
    lam = root / "lambdas.csv"
    return {
        "name": root.name, "dir": str(root), "loss": loss, "sources": sources, "helpfulness": helpful,
        "over_refusal": (report or {}).get("over_refusal") or {}, "fluency": (report or {}).get("fluency"),
        "lambdas_csv": str(lam) if lam.exists() and sum(1 for _ in lam.open()) > 1 else None,
        "metrics_jsonl": str(root / "metrics.jsonl") if (root / "metrics.jsonl").exists() else None,
    }


def _unique_names(runs: list[dict[str, Any]]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        base = run["name"] if run["name"] not in ("final", "eval") else Path(run["dir"]).parent.name
        seen[base] = seen.get(base, 0) + 1
        run["name"] = base if seen[base] == 1 else f"{base}#{seen[base]}"


def compare_runs(runs: Sequence[str | Path], out: str | Path | None = "comparison") -> dict[str, Any]:
    """Side-by-side tables and panels for ``runs``; returns what ``comparison.json`` holds."""
    loaded = [load_run(r) for r in runs]
    _unique_names(loaded)
    out_dir = Path(out or "comparison")
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for run in loaded for k in run["sources"]))
    md = ["# Run comparison", "", "| run | loss | directory |", "|---|---|---|"]
    md += [f"| {r['name']} | {r['loss'] or 'n/a'} | `{r['dir']}` |" for r in loaded]
    plots: list[str] = []
    for key in keys:
        have = [r for r in loaded if key in r["sources"]]
        rows = {r["name"]: r["sources"][key] for r in have}
        extra: dict[str, dict[str, Any]] = {"helpfulness (%)": {r["name"]: r["helpfulness"].get(key) for r in have}}
        if key.startswith("judge:"):
            extra["over-refusal (%)"] = {r["name"]: r["over_refusal"].get(key.split(":")[1]) for r in have}
            extra["fluent answers (%)"] = {r["name"]: (r["fluency"] or {}).get("fluent_share") for r in have}
        md += ["", f"## {source_label(key)}", "", balance_table(rows, extra=extra), "",
               category_table({n: m["per_category"] for n, m in rows.items()})]
        if key == "preference:ref_likelihood":
            continue  # the "before" column: identical bars for runs from one base model
        slug = key.replace(":", "-")
        plot_category_bars({n: m["per_category"] for n, m in rows.items()}, out_dir / f"bars_{slug}.png",
                           title=f"{source_label(key)}: per category (weakest eight marked)")
        plot_balance_panel(rows, out_dir / f"balance_{slug}.png", title=source_label(key))
        plots += [f"bars_{slug}.png", f"balance_{slug}.png"]
    # Only Cat-DPO's loss uses lambda; other runs log what the dual update would do, which would mislead here.
    lam = {r["name"]: Path(r["lambdas_csv"]) for r in loaded if r["lambdas_csv"] and r["loss"] == "catdpo"}
    if lam:
        plots.append(plot_lambda_grid(lam, out_dir / "lambdas.png").name)
    curves = plot_eval_curves({r["name"]: Path(r["metrics_jsonl"]) for r in loaded if r["metrics_jsonl"]},
                              out_dir / "eval_curves.png")
    if curves is not None:
        plots.append(curves.name)
    md += ["", "## Plots", "", *[f"![{p}]({p})" for p in plots]]
    (out_dir / "comparison.md").write_text("\n".join(md) + "\n")
    result = {"runs": loaded, "plots": plots}
    (out_dir / "comparison.json").write_text(json.dumps(result, indent=2, default=str))
    print("\n".join(md[: md.index("## Plots") - 1]))
    print(f"\ncomparison written to {out_dir.resolve()}")
    return result
