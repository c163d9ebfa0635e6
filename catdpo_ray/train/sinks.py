"""Driver-side metric sinks: metrics.jsonl, lambdas.csv, TensorBoard, MLflow / W&B, progress lines.

Rows arrive from the MarginController (``kind`` = step | eval | checkpoint | resume | reset |
warning | startup). On a ``resume`` row the files are cut back to the resumed step, so a restarted run never
shows steps twice and never shows steps newer than the checkpoint it resumed from. A ``reset`` row
(or a ``resume`` at step 0) means the workers restarted with no checkpoint: training starts over,
so both files are cut back to nothing but the CSV header.

Crash safety: the files are append-only while the run goes; a write cut off mid-line (disk full,
kill) leaves a torn last line. Opening the sinks and every cut-back drop torn lines (counted, and
said on the console) and rewrite the file atomically (temp file + ``os.replace``), so a run is
always resumable and a reader never sees a half-rewritten file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections import deque
from pathlib import Path
from typing import Any, TextIO

from catdpo_ray.config import RunConfig
from catdpo_ray.train.startup import describe as describe_startup

#: Steps in the moving average of step times behind the ETA.
ETA_WINDOW = 20


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` beside ``path``, fsync, then ``os.replace``: readers (and a crash) see the
    old file or the whole new one, never a part. Use it for summary.json, config.yaml,
    data_report.json and every other file the run rewrites."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _truncate_jsonl(path: Path, max_step: int) -> tuple[int, int]:
    """Keep the rows with ``step <= max_step``; drop torn (unparsable) lines.

    Returns:
        ``(rows dropped for their step, torn lines dropped)``.
    """
    if not path.exists():
        return 0, 0
    keep, later, torn = [], 0, 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row.get("step", 0))
        except (ValueError, TypeError, AttributeError):
            torn += 1
            continue
        if step <= max_step:
            keep.append(line)
        else:
            later += 1
    atomic_write_text(path, "".join(line + "\n" for line in keep))
    return later, torn


def _truncate_csv(path: Path, max_step: int, header: list[str]) -> tuple[int, int]:
    """Keep ``header`` and the rows with ``step <= max_step``; drop torn rows (wrong column count,
    unparsable numbers, or a last line without its newline).

    Returns:
        ``(rows dropped for their step, torn rows dropped)``.
    """
    if not path.exists():
        atomic_write_text(path, _csv_text([header]))
        return 0, 0
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    complete = text.endswith(("\n", "\r"))  # csv ends rows with \r\n: a cut after \r lost no data
    keep, later, torn = [header], 0, 0
    for i, row in enumerate(csv.reader(lines[1:]), start=1):
        try:
            if len(row) != len(header) or (i == len(lines) - 1 and not complete):
                raise ValueError("torn")
            step = int(row[0])
            _ = [float(x) for x in row[1:]]  # every λ must parse
        except ValueError:
            torn += 1
            continue
        if step <= max_step:
            keep.append(row)
        else:
            later += 1
    if lines and next(csv.reader([lines[0]]), []) != header:
        torn += 1  # a torn header (crash during the very first write) is rewritten
    atomic_write_text(path, _csv_text(keep))
    return later, torn


def _csv_text(rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def format_duration(seconds: float) -> str:
    """``42s``, ``1m05s``, ``2h07m``; ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


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
        self.onpolicy_path = run_dir / "onpolicy.jsonl"
        #: (kind, step, final) of the rows written since the last cut-back: replayed rows are dropped.
        self._written: set[tuple[Any, Any, bool]] = set()
        self._step_times: deque[float] = deque(maxlen=ETA_WINDOW)
        self._warned: dict[str, int] = {}
        #: When the driver called ``fit()`` (``time.time()``), for the ``startup`` rows' console line.
        self.fit_start_time: float | None = None
        # A rerun of an existing run directory: repair torn last lines before anything is appended
        # to them (an append after a torn line would glue two rows into one unreadable line).
        self._cut_back(max_step=sys.maxsize, why="")
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
        if kind == "reset" or (kind == "resume" and row["step"] == 0):
            self._step_times.clear()
            self.last_step = self.last_eval = None
            self._written.clear()
            self._cut_back(max_step=-1, why="restarted from step 0 (no checkpoint was restored)")
            _truncate_jsonl(self.onpolicy_path, -1)
        elif kind == "resume":
            self._step_times.clear()
            self._written.clear()
            self._cut_back(max_step=row["step"], why=f"resumed from the checkpoint at step {row['step']} with the saved lambda")
            _truncate_jsonl(self.onpolicy_path, row["step"])
            self._reload_last()
            for line in row.get("rejected_checkpoints", []):
                self._print(f"WARNING: checkpoint skipped, {line}; resumed from an older one", force=True)
        elif kind == "controller_restored":
            self._print(f"the MarginController was lost and re-created at step {row['step']} from rank 0's copy of "
                        "its state; training goes on", force=True)
        key = (kind, row.get("step"), bool(row.get("final")))
        if kind in ("step", "eval", "checkpoint", "onpolicy"):
            if key in self._written:  # replayed by rank 0 after a controller restart: already written
                return
            self._written.add(key)
        if kind == "onpolicy":  # sampled answers and verdicts: their own file, one line per answer
            self._write_onpolicy(row)
            return
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if kind == "step":
            self.last_step = row
            if row.get("step_time_s"):
                self._step_times.append(float(row["step_time_s"]))
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
        elif kind == "startup":
            self._print(describe_startup(row, self.fit_start_time), force=True)
        elif kind == "warning":
            # Shown once per distinct message; repeats stay in metrics.jsonl and are counted at close.
            seen = self._warned.get(row["message"], 0)
            self._warned[row["message"]] = seen + 1
            if not seen:
                self._print(f"WARNING at step {row['step']}: {row['message']}", force=True)

    def _reload_last(self) -> None:
        """After a cut-back to a checkpoint: the last step and eval rows kept in ``metrics.jsonl`` (a run resumed
        from its final checkpoint logs no new ones, and its summary and model card still need them)."""
        self.last_step = self.last_eval = None
        for line in self.metrics_path.read_text().splitlines():
            row = json.loads(line)  # the cut-back left only whole lines
            if row.get("kind") == "step":
                self.last_step = row
            elif row.get("kind") == "eval":
                self.last_eval = row

    def _write_onpolicy(self, row: dict[str, Any]) -> None:
        """``onpolicy.jsonl``: one line per sampled answer (step, category, prompt, answer, verdict), and
        the round's per-category unsafe rate as a line of its own (``kind: rate``)."""
        step = row["step"]
        with self.onpolicy_path.open("a") as fh:
            fh.write(json.dumps({"kind": "rate", "step": step, "unsafe_rate": row.get("unsafe_rate")}) + "\n")
            for record in row.get("records", []):
                fh.write(json.dumps({"step": step, **record}) + "\n")
        rates = {c: r for c, r in (row.get("unsafe_rate") or {}).items() if r is not None}
        worst = sorted(rates.items(), key=lambda t: -t[1])[:3]
        if worst:
            self._print(f"on-policy @ step {step}: {len(row.get('records', []))} answers judged; highest unsafe rate: "
                        + ", ".join(f"{c} {r:.2f}" for c, r in worst), force=True)

    def _cut_back(self, *, max_step: int, why: str) -> None:
        """Cut both files back to ``max_step`` (dropping torn lines) and say what happened."""
        later_m, torn_m = _truncate_jsonl(self.metrics_path, max_step)
        later_l, torn_l = _truncate_csv(self.lambdas_path, max_step, ["step", *self.categories])
        notes = [f"{name}: dropped {n} torn line{'s' * (n != 1)} (a write was cut off, e.g. disk full or a kill)"
                 for name, n in (("metrics.jsonl", torn_m), ("lambdas.csv", torn_l)) if n]
        if why:
            cut = max(later_m, later_l)
            if max_step < 0:
                if later_m or later_l:  # silent on a fresh run's first start: nothing to reset
                    notes.insert(0, f"{why}: metrics.jsonl and lambdas.csv reset ({later_m} rows removed)")
            else:
                notes.insert(0, why + (f"; removed {cut} newer step rows of the interrupted attempt" if cut else ""))
        for note in notes:
            self._print(note, force=True)

    def eta_seconds(self, step: int) -> float:
        """Remaining steps x the mean of the last :data:`ETA_WINDOW` step times (training time
        only: evaluations and checkpoints add to it); NaN before the first timed step."""
        if not self._step_times:
            return float("nan")
        return (self.total_steps - step) * sum(self._step_times) / len(self._step_times)

    def _progress_line(self, row: dict[str, Any]) -> str:
        """``step 12/100 | loss 0.6931 | acc 0.62 | 10.3 pairs/s | lr 4.50e-04 | ETA 1m05s | top λ: Violence 0.42 (v 0.30), ...``"""
        top = sorted(zip(self.categories, row["lambdas"]), key=lambda t: -t[1])[:3]
        rates = row.get("violation_rate") or {}
        top_txt = ", ".join(
            f"{c} {lam:.2f}" + (f" (v {rates[c]:.2f})" if rates.get(c) is not None else "") for c, lam in top
        )
        return (
            f"step {row['step']}/{self.total_steps} | loss {row['loss']:.4f} | acc {row['reward_acc']:.2f} | "
            f"{row['pairs_per_s']:.1f} pairs/s | lr {row['lr']:.2e} | ETA {format_duration(self.eta_seconds(row['step']))} | "
            f"top λ: {top_txt}"
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
        repeats = {m: n - 1 for m, n in self._warned.items() if n > 1}
        for message, n in repeats.items():
            self._print(f"(the warning {message!r} repeated {n} more time{'s' * (n != 1)}; see metrics.jsonl)", force=True)
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
    """Dotted keys of a nested config dict (the resume contract's own flattening)."""
    from catdpo_ray.train.resume import flatten

    return flatten(d, prefix)
