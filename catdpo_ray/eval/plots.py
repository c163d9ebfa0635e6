"""PNG plots: lambda trajectories, per-category bars, balance panels (matplotlib, Agg backend)."""

from __future__ import annotations

import csv
from pathlib import Path


def _plt():  # noqa: ANN202 - matplotlib's pyplot module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_lambdas(path: Path) -> tuple[list[int], dict[str, list[float]]]:
    """``lambdas.csv`` -> (steps, category -> lambda series)."""
    with path.open() as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    steps = [int(r[0]) for r in body]
    series = {name: [float(r[i + 1]) for r in body] for i, name in enumerate(header[1:])}
    return steps, series


def plot_lambdas(lambdas_csv: Path, out_png: Path, *, reference_margin: float | None = 10.0, title: str = "") -> Path:
    """Per-category lambda trajectories, the cross-category mean (thick), and SafeDPO's fixed margin."""
    plt = _plt()
    steps, series = read_lambdas(lambdas_csv)
    fig, ax = plt.subplots(figsize=(9, 5))
    order = sorted(series, key=lambda c: -(series[c][-1] if series[c] else 0.0))
    cmap = plt.get_cmap("tab20")
    for i, name in enumerate(order):
        ax.plot(steps, series[name], lw=1.2, color=cmap(i % 20), label=name)
    if steps:
        mean = [sum(series[c][j] for c in series) / len(series) for j in range(len(steps))]
        ax.plot(steps, mean, lw=3, color="black", label="mean")
    if reference_margin is not None:
        ax.axhline(reference_margin, ls="--", color="grey", label=f"SafeDPO Δ={reference_margin:g}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("λ_k")
    ax.set_title(title or "per-category dual variables λ_k")
    ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
