"""A sweep's results: the table (CSV, Markdown), the best config YAML and the heat map."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catdpo_ray.config import RunConfig, to_yaml
from catdpo_ray.tune.callbacks import FEASIBLE_KEY, SCORE_KEY, _plain


@dataclass
class SweepResult:
    """What :func:`run_sweep` leaves behind (all paths inside ``sweep_dir``)."""

    sweep_dir: Path
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_config: Path | None
    wall_time_s: float



_METRIC_COLUMNS = ("eval/worst3", "eval/macro", "eval/gap", "eval/helpful_acc")


def collect_rows(grid: Any, axes: Mapping[str, list[Any]], trials_dir: Path, cfg: RunConfig) -> list[dict[str, Any]]:
    """One row per trial from Tune's ResultGrid and the trial's run directory."""
    rows = []
    for res in grid:
        metrics = res.metrics or {}
        name = Path(res.path).name
        run_dir = trials_dir / name
        evals = int(metrics.get("training_iteration", 0))
        if res.error is not None:
            status = "error"
        elif (run_dir / "summary.json").exists():
            status = "finished"
        else:  # ended without its summary: stopped by the scheduler (or interrupted)
            status = "stopped early (ASHA)" if cfg.tune.asha else "stopped"
        worst = -math.inf if cfg.tune.mode == "max" else math.inf
        row: dict[str, Any] = {"trial": name, **{k: _plain(res.config.get(k)) for k in axes}}
        row["score"] = float(metrics.get(SCORE_KEY, worst))
        row["objective"] = float(metrics.get(cfg.tune.objective, math.nan))
        row["feasible"] = bool(metrics.get(FEASIBLE_KEY, 0.0))
        row.update({key: float(metrics.get(key, math.nan)) for key in _METRIC_COLUMNS if key != cfg.tune.objective})
        row.update({"evals": evals, "step": int(metrics.get("step", 0)), "status": status, "run_dir": str(run_dir)})
        rows.append(row)
    rows.sort(key=lambda r: rank_key(r, cfg.tune.mode))
    return rows


def _num(x: Any, bad: float) -> float:
    return bad if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def rank_key(row: Mapping[str, Any], mode: str, *, by: str = "score") -> tuple[float, ...]:
    """Sort key, best first: errors last, then ``by`` (guarded score) in ``mode``, ties broken by
    higher macro accuracy, then higher helpfulness."""
    sign = -1.0 if mode == "max" else 1.0
    return (float(row["status"] == "error"), sign * _num(row.get(by), -sign * math.inf),
            -_num(row.get("eval/macro"), -math.inf), -_num(row.get("eval/helpful_acc"), -math.inf))


def pick_best(rows: Sequence[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The best feasible trial by score; if none is feasible, the best by raw objective."""
    done = [r for r in rows if r["status"] != "error" and not math.isnan(r["objective"])]
    feasible = [r for r in done if r["feasible"]]
    pool, by = (feasible, "score") if feasible else (done, "objective")
    return min(pool, key=lambda r: rank_key(r, mode, by=by)) if pool else None


def _json_safe(value: Any) -> Any:
    """Non-finite floats -> strings ("-inf"), so the JSON files stay standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else ("-inf" if value == -math.inf else "inf" if value == math.inf else f"{value:.4g}")
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def grid_cells(rows: Sequence[Mapping[str, Any]], mode: str) -> dict[tuple[float, float], Mapping[str, Any]]:
    """(eta, epsilon) -> the best trial in that cell (over other axes and repeats)."""
    cells: dict[tuple[float, float], Mapping[str, Any]] = {}
    for r in rows:
        if r["status"] == "error":
            continue
        key = (float(r["dual.eta"]), float(r["dual.epsilon"]))
        if key not in cells or rank_key(r, mode) < rank_key(cells[key], mode):
            cells[key] = r
    return cells


def _cell_note(r: Mapping[str, Any]) -> str:
    notes = ([] if r["feasible"] else ["infeasible"]) + ([f"ASHA stop @ eval {r['evals']}"] if r["status"].startswith("stopped") else [])
    return ", ".join(notes)


def pivot_markdown(rows: Sequence[Mapping[str, Any]], mode: str, objective: str) -> str:
    """Objective over (eta rows, epsilon columns); infeasible cells marked."""
    cells = grid_cells(rows, mode)
    etas = sorted({k[0] for k in cells})
    epss = sorted({k[1] for k in cells})
    lines = [f"| {objective}: η \\ ε | " + " | ".join(f"{e:g}" for e in epss) + " |", "|---|" + "---:|" * len(epss)]
    for eta in etas:
        vals = []
        for eps in epss:
            r = cells.get((eta, eps))
            note = "" if r is None else _cell_note(r)
            vals.append("—" if r is None else _fmt(r["objective"]) + (f" ({note})" if note else ""))
        lines.append(f"| {eta:g} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def plot_heatmap(rows: Sequence[Mapping[str, Any]], out_png: Path, *, objective: str, mode: str, grid: bool,
                 best: Mapping[str, Any] | None = None) -> Path:
    """Objective over (η, ε): a cell grid for grid search, else a log-log scatter. Infeasible = grey x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = grid_cells(rows, mode)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    cmap = plt.get_cmap("viridis" if mode == "max" else "viridis_r").with_extremes(bad="lightgrey")
    if grid and cells:
        etas, epss = sorted({k[0] for k in cells}), sorted({k[1] for k in cells})
        z = np.full((len(etas), len(epss)), np.nan)
        for (eta, eps), r in cells.items():
            if r["feasible"] and not math.isnan(r["objective"]):
                z[etas.index(eta), epss.index(eps)] = r["objective"]
        im = ax.imshow(np.ma.masked_invalid(z), cmap=cmap, origin="lower", aspect="auto")
        lo, hi = (float(np.nanmin(z)), float(np.nanmax(z))) if np.isfinite(z).any() else (0.0, 1.0)
        for (eta, eps), r in cells.items():
            i, j = etas.index(eta), epss.index(eps)
            note = _cell_note(r)
            text = _fmt(r["objective"]) + (f"\n{note}" if note else "")
            star = best is not None and float(best["dual.eta"]) == eta and float(best["dual.epsilon"]) == eps
            # dark text on the bright end of viridis, light text on the dark end and on grey
            frac = (z[i, j] - lo) / (hi - lo) if np.isfinite(z[i, j]) and hi > lo else 1.0
            if mode == "min":
                frac = 1.0 - frac
            ax.text(j, i, ("★ best\n" if star else "") + text, ha="center", va="center", fontsize=9,
                    color="black" if frac > 0.5 or not np.isfinite(z[i, j]) else "white")
        ax.set_xticks(range(len(epss)), [f"{e:g}" for e in epss])
        ax.set_yticks(range(len(etas)), [f"{e:g}" for e in etas])
    else:
        pts = list(cells.items())
        ok = [(k, r) for k, r in pts if r["feasible"] and not math.isnan(r["objective"])]
        im = ax.scatter([k[1] for k, _ in ok], [k[0] for k, _ in ok], c=[r["objective"] for _, r in ok], cmap=cmap, s=80)
        bad = [k for k, r in pts if not r["feasible"]]
        ax.scatter([k[1] for k in bad], [k[0] for k in bad], marker="x", color="grey", label="infeasible")
        if best is not None:
            ax.scatter([best["dual.epsilon"]], [best["dual.eta"]], marker="*", s=300, facecolors="none", edgecolors="red")
        if pts:
            ax.set_xscale("log")
            ax.set_yscale("log")
        else:  # every trial failed before its first evaluation: say so instead of an empty log plot
            ax.text(0.5, 0.5, "no trial reported a result", ha="center", va="center", transform=ax.transAxes)
    if cells:
        fig.colorbar(im, ax=ax, label=objective)
    ax.set_xlabel("ε (dual.epsilon)")
    ax.set_ylabel("η (dual.eta)")
    ax.set_title(f"{objective} ({mode}) over (η, ε); grey = below the helpfulness floor")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def write_sweep_outputs(sweep_dir: Path, cfg: RunConfig, axes: Mapping[str, list[Any]], rows: list[dict[str, Any]],
                        *, wall_time_s: float, extra: Mapping[str, Any] | None = None) -> SweepResult:
    """results.csv, results.md, best_config.yaml, heatmap.png and sweep.json in ``sweep_dir``."""
    keys = list(axes)
    metric_cols = [c for c in _METRIC_COLUMNS if c != cfg.tune.objective]
    columns = ["trial", *keys, "score", "objective", "feasible", *metric_cols, "evals", "step", "status", "run_dir"]
    with (sweep_dir / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:  # each run directory says how its trial ended (ASHA-stopped ones have no summary.json)
        run_dir = Path(row["run_dir"]) if row.get("run_dir") else None  # Path("") would be the working directory
        if run_dir is not None and run_dir.is_dir():
            (run_dir / "trial.json").write_text(json.dumps(_json_safe(row), indent=2))
    best = pick_best(rows, cfg.tune.mode)
    best_path: Path | None = None
    if best is not None:
        best_cfg = cfg.replace({k: best[k] for k in keys})
        best_path = sweep_dir / "best_config.yaml"
        header = (f"# Best trial of sweep {sweep_dir.name}: {best['trial']}\n"
                  f"# {', '.join(f'{k}={best[k]}' for k in keys)} -> {cfg.tune.objective} = {_fmt(best['objective'])}"
                  f" (feasible: {best['feasible']}, helpfulness floor {cfg.tune.helpfulness_floor}%)\n"
                  f"# Train it: catdpo-ray train --config {best_path}\n")
        best_path.write_text(header + to_yaml(best_cfg))
    plot_heatmap(rows, sweep_dir / "heatmap.png", objective=cfg.tune.objective, mode=cfg.tune.mode,
                 grid=cfg.tune.search == "grid", best=best)
    shown = ["trial", *keys, "objective", "feasible", *metric_cols, "evals", "status"]
    md = [f"# Sweep {sweep_dir.name}", "",
          f"Objective `{cfg.tune.objective}` ({cfg.tune.mode}); feasible = `eval/helpful_acc` >= "
          f"{cfg.tune.helpfulness_floor}% (infeasible trials score {'-inf' if cfg.tune.mode == 'max' else 'inf'}); "
          f"search {cfg.tune.search}, ASHA {'on' if cfg.tune.asha else 'off'}; wall time {wall_time_s:.0f} s.", "",
          *([pivot_markdown(rows, cfg.tune.mode, cfg.tune.objective), ""] if cfg.tune.search == "grid" else []),
          markdown_table(rows, shown), ""]
    if best is not None:
        md.append(f"Best: {', '.join(f'`{k}={best[k]}`' for k in keys)} ({best['trial']})"
                  + ("" if best["feasible"] else " -- **no trial met the helpfulness floor**; this is the best infeasible one")
                  + f". `catdpo-ray train --config {best_path}`")
    (sweep_dir / "results.md").write_text("\n".join(md) + "\n")
    summary = {"sweep": sweep_dir.name, "wall_time_s": wall_time_s, "trials": len(rows),
               "best": best, "best_config": str(best_path) if best_path else None, **(extra or {})}
    (sweep_dir / "sweep.json").write_text(json.dumps(_json_safe(summary), indent=2, default=str))
    return SweepResult(sweep_dir, rows, best, best_path, wall_time_s)
