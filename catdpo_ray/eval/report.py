"""Run-directory outputs: the before/after table, the lambda plot, the model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from catdpo_ray.config import RunConfig


def _fmt(x: float | None) -> str:
    return "  n/a" if x is None else f"{x:5.1f}"


def before_after_table(final_eval: dict[str, Any]) -> str:
    """Markdown table: per-category held-out preference accuracy of the reference (before) and
    the trained policy (after, by its own likelihood and by implicit reward), plus the summary rows."""
    per = final_eval["per_category"]
    lines = [
        "| category | safety-gap pairs | before (ref likelihood) | after (policy likelihood) | after (implicit reward) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in sorted(per, key=lambda c: (per[c]["ref_likelihood"] is None, per[c]["ref_likelihood"] or 0.0)):
        e = per[name]
        lines.append(f"| {name} | {e['n']} | {_fmt(e['ref_likelihood'])} | {_fmt(e['likelihood'])} | {_fmt(e['implicit'])} |")
    for label, key in (("Macro", "macro"), ("Worst-3", "worst3"), ("Gap (pp)", "gap"), ("Variance x1e3", "variance")):
        lines.append(
            f"| **{label}** | | {_fmt(final_eval.get('eval/ref_' + key))} | {_fmt(final_eval.get('eval/' + key))} | "
            f"{_fmt(final_eval.get('eval/implicit_' + key))} |"
        )
    lines.append(
        f"| **helpfulness (both-safe pairs)** | | {_fmt(final_eval.get('eval/ref_helpful_likelihood_acc'))} | "
        f"{_fmt(final_eval.get('eval/helpful_likelihood_acc'))} | {_fmt(final_eval.get('eval/helpful_acc'))} |"
    )
    return "\n".join(lines)


def write_run_outputs(run_dir: Path, cfg: RunConfig, summary: dict[str, Any]) -> None:
    """``before_after.md`` (printed too) and ``lambdas.png``."""
    from catdpo_ray.eval.plots import plot_lambdas

    final_eval = summary.get("final_eval")
    if final_eval:
        table = before_after_table(final_eval)
        (run_dir / "before_after.md").write_text(
            "# Held-out per-category preference accuracy (%)\n\n" + table + "\n"
        )
        print("\nHeld-out per-category preference accuracy (%), before -> after training:\n" + table, flush=True)
    lam = run_dir / "lambdas.csv"
    if lam.exists() and sum(1 for _ in lam.open()) > 1:
        margin = cfg.loss.delta if cfg.loss.name in ("safedpo", "catdpo") else None
        plot_lambdas(lam, run_dir / "lambdas.png", reference_margin=margin, title=f"{run_dir.name}: λ_k per category")
    print(f"\nrun directory: {run_dir}", flush=True)


def model_card(cfg: RunConfig, last_step: dict[str, Any] | None, final_eval: dict[str, Any] | None) -> str:
    """A short model card for ``final/README.md``: data, loss, final lambda."""
    data = f"hub dataset {cfg.data.hub_name} ({cfg.data.hub_config})" if cfg.data.hub_name else f"train={cfg.data.train}"
    lines = [
        "# catdpo-ray model",
        "",
        f"- base model: `{cfg.model.name_or_path}`" + (" (LoRA merged)" if cfg.model.lora.enabled else ""),
        f"- data: {data}; pairs: `{cfg.pair_mode}`",
        f"- loss: `{cfg.loss.name}` (beta={cfg.loss.beta}, delta={cfg.loss.delta}); dual: eta={cfg.dual.eta}, "
        f"epsilon={cfg.dual.epsilon}, agg={cfg.dual.agg}, violation={cfg.dual.violation}",
        f"- steps: {last_step['step'] if last_step else 'n/a'}",
        "",
    ]
    if last_step:
        lines += ["| category | final λ |", "|---|---:|"]
        lines += [f"| {c} | {lam:.4f} |" for c, lam in zip(cfg.data.categories, last_step["lambdas"])]
    if final_eval:
        lines += ["", "## Held-out preference accuracy (%)", "", before_after_table(final_eval)]
    return "\n".join(lines) + "\n"
