"""Driver-side metric sinks: metrics.jsonl, lambdas.csv, TensorBoard, MLflow / W&B, progress lines.

Rows arrive from the MarginController (``kind`` = step | eval | checkpoint | resume | warning).
On a ``resume`` row the files are cut back to the resumed step, so a restarted run never shows
steps twice and never shows steps newer than the checkpoint it resumed from.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from catdpo_ray.config import RunConfig


def _truncate_jsonl(path: Path, max_step: int) -> None:
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= max_step]
    path.write_text("".join(line + "\n" for line in keep))


def _truncate_csv(path: Path, max_step: int) -> None:
    if not path.exists():
        return
    rows = list(csv.reader(path.open()))
    keep = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= max_step]
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(keep)


class MetricSinks:
    """Writes every drained row to the run directory and the configured trackers."""

    def __init__(self, cfg: RunConfig, run_dir: Path, total_steps: int, out: TextIO = sys.stdout) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.out = out
        self.categories = list(cfg.data.categories)
        self.metrics_path = run_dir / "metrics.jsonl"
        self.lambdas_path = run_dir / "lambdas.csv"
        if not self.lambdas_path.exists():
            with self.lambdas_path.open("w", newline="") as fh:
                csv.writer(fh).writerow(["step", *self.categories])
        self.last_eval: dict[str, Any] | None = None
        self.last_step: dict[str, Any] | None = None
        self._tb = None
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self._mlflow = None
        if cfg.logging.mlflow_tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(cfg.logging.mlflow_tracking_uri)
            mlflow.set_experiment(cfg.logging.mlflow_experiment)
            mlflow.start_run(run_name=run_dir.name)
            mlflow.log_params({k: str(v) for k, v in _flat(cfg.to_dict()).items()})
            self._mlflow = mlflow
        self._wandb = None
        if cfg.logging.wandb_project:
            import wandb

            self._wandb = wandb.init(project=cfg.logging.wandb_project, name=run_dir.name, config=cfg.to_dict())

    def handle(self, row: dict[str, Any]) -> None:
        kind = row.get("kind")
        if kind == "resume":
            _truncate_jsonl(self.metrics_path, row["step"])
            _truncate_csv(self.lambdas_path, row["step"])
            self._print(f"resumed from the checkpoint at step {row['step']} with the saved lambda", force=True)
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if kind == "step":
            self.last_step = row
            with self.lambdas_path.open("a", newline="") as fh:
                csv.writer(fh).writerow([row["step"], *(repr(x) for x in row["lambdas"])])
            self._scalars(row["step"], _numeric(row, prefix="train/"))
            self._scalars(row["step"], {f"lambda/{c}": lam for c, lam in zip(self.categories, row["lambdas"])})
            self._scalars(row["step"], {f"violation/{c}": r for c, r in row["violation_rate"].items() if r is not None})
            if self.cfg.logging.progress and (row["step"] % self.cfg.train.log_every == 0 or row["step"] == self.total_steps):
                self._print(self._progress_line(row))
        elif kind == "eval":
            self.last_eval = row
            self._scalars(row["step"], _numeric(row))
            self._print(
                f"eval @ step {row['step']}: pref-acc macro {row.get('eval/macro', float('nan')):.1f}  "
                f"worst-3 {row.get('eval/worst3', float('nan')):.1f}  gap {row.get('eval/gap', float('nan')):.1f}  "
                f"helpful {row.get('eval/helpful_acc', float('nan')):.1f}",
                force=True,
            )
        elif kind == "checkpoint":
            self._print(f"checkpoint saved at step {row['step']}{' (final)' if row.get('final') else ''}", force=True)
        elif kind == "warning":
            self._print(f"WARNING at step {row['step']}: {row['message']}", force=True)

    def _progress_line(self, row: dict[str, Any]) -> str:
        worst = sorted(zip(self.categories, row["lambdas"]), key=lambda t: -t[1])[:3]
        worst_txt = ", ".join(
            f"{c} λ={lam:.2f} v={row['violation_rate'].get(c) or 0:.2f}" for c, lam in worst
        )
        return (
            f"step {row['step']}/{self.total_steps} | loss {row['loss']:.4f} | acc {row['reward_acc']:.2f} | "
            f"{row['pairs_per_s']:.1f} pairs/s {row['tokens_per_s']:.0f} tok/s | lr {row['lr']:.2e} | top λ: {worst_txt}"
        )

    def _print(self, text: str, force: bool = False) -> None:
        print(text, file=self.out, flush=True)

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
        if self._mlflow is not None:
            self._mlflow.log_metrics({k.replace("/", "_"): v for k, v in values.items()}, step=step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._mlflow is not None:
            self._mlflow.end_run()
        if self._wandb is not None:
            self._wandb.finish()


def _numeric(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    skip = {"step", "epoch", "kind", "dual_updates", "world_size"}
    return {prefix + k: float(v) for k, v in row.items() if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out
