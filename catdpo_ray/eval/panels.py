"""PNG panels for reports and comparisons (matplotlib, Agg backend).

- :func:`plot_category_bars`: per-category scores, one bar group per category and one bar per
  series (a judge, a score source or a run); each series' weakest eight are hatched and outlined.
- :func:`plot_balance_panel`: Macro, Worst-3, Gap and Variance side by side, one bar per series,
  optional error bars (the benchmark's std over seeds).
- :func:`plot_lambda_grid`: per-category lambda trajectories of several runs, one subplot each,
  with SafeDPO's fixed margin (Delta = 10) as the reference line.
- :func:`plot_eval_curves`: held-out Worst-3 / Macro over training steps from ``metrics.jsonl``;
- :func:`report_plots`: every PNG of one ``catdpo-ray eval`` report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from catdpo_ray.eval.metrics import weakest
from catdpo_ray.eval.plots import _plt, read_lambdas
from catdpo_ray.eval.sources import report_sources, source_label

#: (key, panel title) of the balance panel; Gap and Variance are better when lower.
BALANCE_KEYS: tuple[tuple[str, str], ...] = (
    ("macro", "Macro (%) ↑"),
    ("worst3", "Worst-3 (%) ↑"),
    ("gap", "Gap (pp) ↓"),
    ("variance", "Variance ×10³ ↓"),
)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def plot_category_bars(series: Mapping[str, Mapping[str, float | None]], out_png: Path, *, title: str = "",
                       weakest_n: int = 8, xlabel: str = "score (%)") -> Path:
    """Grouped horizontal bars of per-category scores, weakest ``weakest_n`` of each series marked.

    Args:
        series: series name -> (category -> score in percent, None when the category has no prompts).
        out_png: where to write the PNG.
        title: figure title.
        weakest_n: how many lowest categories of each series get the hatch and red outline.
        xlabel: the score axis label.
    """
    plt = _plt()
    names = list(series)
    categories = list(dict.fromkeys(c for s in series.values() for c in s))

    def mean_score(c: str) -> float:
        vals = [float(s[c]) for s in series.values() if _finite(s.get(c))]  # type: ignore[arg-type]
        return sum(vals) / len(vals) if vals else math.inf

    categories.sort(key=lambda c: (-mean_score(c), c))  # best at the bottom, weakest on top
    marked = {name: set(weakest(series[name], weakest_n)) for name in names}
    height = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(categories) * max(1, len(names)) ** 0.5 + 1.6))
    cmap = plt.get_cmap("tab10")
    for j, name in enumerate(names):
        for i, c in enumerate(categories):
            value = series[name].get(c)
            y = i + (j - (len(names) - 1) / 2) * height
            if not _finite(value):
                ax.text(1, y, "no prompts", va="center", fontsize=6, color="grey")
                continue
            weak = c in marked[name]
            ax.barh(y, float(value), height=height, color=cmap(j % 10), hatch="///" if weak else None,  # type: ignore[arg-type]
                    edgecolor="red" if weak else "none", linewidth=1.2 if weak else 0)
            ax.text(float(value) + 0.5, y, f"{float(value):.0f}", va="center", fontsize=5)  # type: ignore[arg-type]
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(j % 10)) for j in range(len(names))]
    handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="red", hatch="///"))
    ax.legend(handles, [*names, f"weakest {weakest_n}"], fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_yticks(range(len(categories)), categories, fontsize=7)
    ax.set_xlim(0, 108)
    ax.set_xlabel(xlabel)
    ax.set_title(title or "per-category scores", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_balance_panel(metrics: Mapping[str, Mapping[str, Any]], out_png: Path, *,
                       errors: Mapping[str, Mapping[str, float]] | None = None, title: str = "") -> Path:
    """Four bar charts (Macro, Worst-3, Gap, Variance), one bar per series.

    Args:
        metrics: series name -> dict with ``macro``, ``worst3``, ``gap``, ``variance`` (None = n/a).
        out_png: where to write the PNG.
        errors: optional series name -> same keys -> standard deviation (drawn as error bars).
        title: figure title.
    """
    plt = _plt()
    names = list(metrics)
    fig, axes = plt.subplots(1, 4, figsize=(3.2 * 4, 3.6 + 0.08 * max(len(n) for n in names) if names else 3.6))
    cmap = plt.get_cmap("tab10")
    for ax, (key, label) in zip(axes, BALANCE_KEYS):
        values = [metrics[n].get(key) for n in names]
        heights = [float(v) if _finite(v) else 0.0 for v in values]
        yerr = [float((errors or {}).get(n, {}).get(key) or 0.0) for n in names] if errors else None
        bars = ax.bar(range(len(names)), heights, color=[cmap(i % 10) for i in range(len(names))], yerr=yerr, capsize=3)
        for i, (bar, v) in enumerate(zip(bars, values)):  # the value sits above its error bar
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + (yerr[i] if yerr else 0.0),
                    f"{v:.1f}" if _finite(v) else "n/a", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
        if key in ("macro", "worst3"):
            ax.set_ylim(0, 105)
    fig.suptitle(title or "category balance", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_lambda_grid(runs: Mapping[str, Path], out_png: Path, *, reference_margin: float | None = 10.0) -> Path:
    """Per-category lambda trajectories, one subplot per run, mean in black, SafeDPO's Delta dashed.

    Args:
        runs: run name -> its ``lambdas.csv``.
        out_png: where to write the PNG.
        reference_margin: SafeDPO's fixed margin drawn as a horizontal line (None: no line).
    """
    plt = _plt()
    n = max(1, len(runs))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), sharey=True, squeeze=False)
    cmap = plt.get_cmap("tab20")
    for ax, (name, path) in zip(axes[0], runs.items()):
        steps, series = read_lambdas(Path(path))
        for i, cat in enumerate(sorted(series)):
            ax.plot(steps, series[cat], lw=0.9, color=cmap(i % 20))
        if steps and series:
            mean = [sum(s[j] for s in series.values()) / len(series) for j in range(len(steps))]
            ax.plot(steps, mean, lw=2.5, color="black", label="mean λ")
        if reference_margin is not None:
            ax.axhline(reference_margin, ls="--", color="grey", label=f"SafeDPO Δ={reference_margin:g}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("optimizer step")
    axes[0][0].set_ylabel("λ_k")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def read_eval_rows(metrics_jsonl: Path) -> list[dict[str, Any]]:
    """The ``"kind": "eval"`` rows of a run's ``metrics.jsonl``, in step order."""
    rows = []
    with Path(metrics_jsonl).open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                if row.get("kind") == "eval":
                    rows.append(row)
    return sorted(rows, key=lambda r: r.get("step", 0))


def plot_eval_curves(runs: Mapping[str, Path], out_png: Path) -> Path | None:
    """Held-out Worst-3 and Macro (policy-likelihood preference accuracy) over steps; None if no eval rows."""
    data = {name: read_eval_rows(path) for name, path in runs.items()}
    data = {name: rows for name, rows in data.items() if rows}
    if not data:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((axes[0], "eval/worst3", "Worst-3 (%)"), (axes[1], "eval/macro", "Macro (%)")):
        for name, rows in data.items():
            pts = [(r["step"], r[key]) for r in rows if _finite(r.get(key))]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=name)
        ax.set_xlabel("optimizer step")
        ax.set_title(f"held-out {label}, policy likelihood", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _run_loss(run_dir: Path) -> str | None:
    """``loss.name`` of the run whose ``final/`` is evaluated (None if not a run)."""
    import yaml

    path = run_dir / "config.yaml"
    return ((yaml.safe_load(path.read_text()) or {}).get("loss") or {}).get("name") if path.exists() else None


def report_plots(report: dict[str, Any], model_dir: Path, out_dir: Path) -> list[str]:
    """Per-category bars per score source, the balance panel, and the run's lambda / curve plots."""
    from catdpo_ray.eval.plots import plot_lambdas

    sources = report_sources(report)
    plots = []
    for key, block in sources.items():
        slug = key.replace(":", "-")
        plot_category_bars({source_label(key): block["per_category"]}, out_dir / f"bars_{slug}.png",
                           title=f"{source_label(key)} per category (weakest eight marked)")
        plots.append(f"bars_{slug}.png")
    plot_balance_panel({source_label(k): b for k, b in sources.items()}, out_dir / "balance.png",
                       title=f"category balance of {model_dir.parent.name}/{model_dir.name}")
    plots.append("balance.png")
    run_dir = model_dir.parent
    lam = run_dir / "lambdas.csv"
    if lam.exists() and sum(1 for _ in lam.open()) > 1 and _run_loss(run_dir) == "catdpo":
        plot_lambdas(lam, out_dir / "lambdas.png", reference_margin=10.0, title=f"{run_dir.name}: λ_k per category")
        plots.append("lambdas.png")
    if (run_dir / "metrics.jsonl").exists() and plot_eval_curves({run_dir.name: run_dir / "metrics.jsonl"},
                                                                 out_dir / "eval_curves.png"):
        plots.append("eval_curves.png")
    return plots
