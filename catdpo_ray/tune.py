"""Ray Tune sweep over ``dual.eta`` x ``dual.epsilon`` (and any other key): ``catdpo-ray tune``.

Ray Train V2 pattern (Ray >= 2.51; ``Tuner(trainer)`` is gone): the Tune trainable is a *driver
function*, :func:`_trial`, that builds one ``TorchTrainer`` per trial through
:func:`catdpo_ray.train.driver.fit_run`. Worker reports reach Tune through
:class:`GuardedTuneReport`, a ``TuneReportCallback`` that adds the guarded score to each held-out
evaluation.

:func:`run_sweep`:

1. resolves the search axes (``tune.eta``, ``tune.epsilon``, ``tune.extra``) and checks that every
   value gives a valid config that needs the same tokenized data as the base config;
2. tokenizes **once** on the driver (:func:`~catdpo_ray.train.driver.prepare_data`) and hands the
   materialised datasets to every trial through ``tune.with_parameters`` (the object store);
3. runs a ``Tuner`` (grid | random | Optuna), ASHA on the guarded score, at most as many trials at
   once as the cluster has CPUs/GPUs for;
4. writes ``results.csv``, ``results.md``, ``best_config.yaml`` and ``heatmap.png``.

Guarded objective: a trial's score is ``tune.objective`` (default ``eval/worst3``, held-out Worst-3
per-category preference accuracy, percent) while ``eval/helpful_acc`` (implicit-reward accuracy on
the both-safe pairs, percent) is at least ``tune.helpfulness_floor``; below the floor the trial is
*infeasible* and scores -inf (``mode=max``) or +inf (``mode=min``), so it ranks last and ASHA stops
it at its next rung.
"""

from __future__ import annotations

import csv
import json
import math
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ray import tune as ray_tune
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.tune.integration.ray_train import TuneReportCallback

from catdpo_ray.config import ConfigError, RunConfig, from_dict, load_config, to_yaml

#: Result keys added to every evaluation report: the guarded score (what Tune and ASHA rank) and
#: 1.0/0.0 for the helpfulness guard.
SCORE_KEY = "sweep/score"
FEASIBLE_KEY = "sweep/feasible"
#: File in each trial's run directory listing the placement groups its Train run reserved.
PLACEMENT_GROUP_LOG = "placement_groups.txt"
#: Memory (bytes) a trial driver reserves; it holds no CPU (see :func:`trial_driver_resources`).
TRIAL_DRIVER_MEMORY = 256 * 1024**2
#: Held-out evaluations per trial when ``train.eval_every`` is 0 and ASHA needs intermediate rungs.
DEFAULT_EVALS_PER_TRIAL = 4
#: ``catdpo-ray tune`` without ``--config`` (= ``jobs/sweep_tiny_cpu.yaml``): a 2 x 2 grid (the
#: tune.eta x tune.epsilon defaults) on the tiny model and the bundled corpus, sized to finish in a
#: few minutes on 2 CPU cores. One worker per trial lets two trials (each a real TorchTrainer +
#: DeepSpeed run) train side by side on 2 cores. Three held-out evaluations (steps 15, 30, 45) give
#: ASHA rungs at the first two; evaluation, not the 45 steps, is most of a trial's time here.
DEFAULT_SWEEP_OVERRIDES: tuple[str, ...] = (
    "scaling.num_workers=1",
    "train.max_steps=45",
    "train.eval_every=15",
    "logging.progress=false",
    "tune.asha_grace_period=1",
)


def load_sweep_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """The sweep's config: ``path`` + overrides, or without a file the embedded default sweep."""
    base = [] if path is not None else list(DEFAULT_SWEEP_OVERRIDES)
    return load_config(path, [*base, *overrides])


# ---------------------------------------------------------------------------------------------
# search space


def search_axes(cfg: RunConfig) -> dict[str, list[Any]]:
    """Dotted key -> candidate values: ``dual.eta``, ``dual.epsilon``, then ``tune.extra``."""
    axes: dict[str, list[Any]] = {"dual.eta": list(cfg.tune.eta), "dual.epsilon": list(cfg.tune.epsilon)}
    for key, values in cfg.tune.extra.items():
        if key in axes:
            raise ConfigError(f"tune.extra.{key}: sweep {key} with tune.{key.split('.')[-1]} instead")
        axes[key] = list(values)
    for key, values in axes.items():
        if not values:
            raise ConfigError(f"sweep axis {key}: needs at least one value")
    return axes


def _data_key(cfg: RunConfig) -> tuple[Any, ...]:
    """Everything :func:`prepare_data` reads: trials must agree on it to share one tokenization."""
    m = cfg.model
    return (cfg.data, m.name_or_path, m.revision, m.tokenizer, m.trust_remote_code, cfg.pair_mode,
            cfg.loss.name == "catdpo")


def check_axes(cfg: RunConfig, axes: Mapping[str, list[Any]]) -> None:
    """Every value must give a valid config whose tokenized data equals the base config's."""
    base_key = _data_key(cfg)
    for key, values in axes.items():
        for value in values:
            trial = cfg.replace({key: value})  # raises ConfigError naming the key
            if _data_key(trial) != base_key:
                raise ConfigError(
                    f"sweep axis {key}={value!r} changes the tokenized data; a sweep tokenizes once and shares the "
                    "data between trials, so data.*, the model/tokenizer and the pair construction cannot be swept"
                )


def _is_float_axis(values: Sequence[Any]) -> bool:
    return all(isinstance(v, float) for v in values) and len(set(values)) > 1


def param_space(cfg: RunConfig, axes: Mapping[str, list[Any]]) -> dict[str, Any]:
    """Tune search space. Grid: every listed value. Random/Optuna: a float list is the range
    [min, max] (log-uniform when all values are positive); any other list is a categorical choice."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, values in axes.items():
        if cfg.tune.search == "grid":
            space[key] = tune.grid_search(list(values))
        elif _is_float_axis(values):
            lo, hi = min(values), max(values)
            space[key] = tune.loguniform(lo, hi) if lo > 0 else tune.uniform(lo, hi)
        else:
            space[key] = tune.choice(list(values))
    return space


def num_trials(cfg: RunConfig, axes: Mapping[str, list[Any]]) -> int:
    """Trials the sweep runs: the grid size x ``tune.num_samples`` for grid, else ``num_samples``."""
    if cfg.tune.search != "grid":
        return cfg.tune.num_samples
    return math.prod(len(v) for v in axes.values()) * cfg.tune.num_samples


def make_searcher(cfg: RunConfig, concurrency: int) -> Any:
    """Seeded grid/random variant generator, or Optuna's TPE (``tune.search=optuna``).

    The variant generator takes the concurrency cap itself: Tune ignores ``max_concurrent_trials``
    for a ``SearchGenerator`` instance (it wraps only ``Searcher`` s such as Optuna's)."""
    if cfg.tune.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=cfg.train.seed)  # metric and mode come from TuneConfig
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=cfg.train.seed, max_concurrent=concurrency)


def evals_per_trial(total_steps: int, eval_every: int) -> int:
    """Evaluation reports a full trial makes: every ``eval_every`` steps before the end, plus the end."""
    return 1 if eval_every <= 0 else math.ceil(total_steps / eval_every)


def make_scheduler(cfg: RunConfig, max_evals: int) -> Any:
    """ASHA over evaluation reports (one Tune iteration = one held-out evaluation), or FIFO.

    The rungs stop short of a trial's last evaluation (``max_t = max_evals - 1``, and no stop at
    ``max_t``): a trial that reaches its end is never killed at its final report, so it finishes
    writing its run directory (summary, final model) before Tune ends it."""
    if not cfg.tune.asha or max_evals < 2:
        return None
    from ray.tune.schedulers import ASHAScheduler

    max_t = max_evals - 1
    return ASHAScheduler(time_attr="training_iteration", max_t=max_t,  # metric/mode: TuneConfig
                         grace_period=max(1, min(cfg.tune.asha_grace_period, max_t)), reduction_factor=2,
                         stop_last_trials=False)


def trial_driver_resources(cfg: RunConfig) -> dict[str, float]:
    """What a trial's driver process reserves: no CPU (it only waits on ``fit`` while the Train
    workers hold their own CPUs/GPUs), just memory, since Tune needs a non-empty request. In local
    mode (``num_workers=0``) training runs inside the driver, which then holds one CPU."""
    if cfg.scaling.num_workers == 0:
        return {"CPU": 1.0}
    return {"CPU": 0.0, "memory": float(TRIAL_DRIVER_MEMORY)}


def trial_concurrency(cfg: RunConfig, cluster: Mapping[str, float], trials: int) -> int:
    """Trials at once: ``tune.max_concurrent``, or as many TorchTrainers as the cluster's CPUs (and
    GPUs) hold at once (the trial drivers add no CPU, see :func:`trial_driver_resources`)."""
    if cfg.tune.max_concurrent > 0:
        return max(1, min(cfg.tune.max_concurrent, trials))
    sc = cfg.scaling
    cpus = sc.cpus_per_worker * sc.num_workers if sc.num_workers > 0 else 1.0
    fit = int(cluster.get("CPU", 0.0) // cpus) if cpus > 0 else trials
    if sc.use_gpu:
        fit = min(fit, int(cluster.get("GPU", 0.0) // sc.num_workers))
    return max(1, min(fit, trials))


# ---------------------------------------------------------------------------------------------
# guarded objective and the report callback


def guarded_score(metrics: Mapping[str, Any], objective: str, mode: str, floor: float) -> tuple[float, bool]:
    """(score, feasible): the objective, or the worst value (-inf for max, +inf for min) when
    ``eval/helpful_acc`` < ``floor`` or the objective is NaN."""
    if objective not in metrics:
        raise KeyError(f"tune.objective {objective!r} is not among the reported metrics {sorted(metrics)}")
    raw = float(metrics[objective])
    helpful = metrics.get("eval/helpful_acc")
    feasible = floor <= 0 or (helpful is not None and float(helpful) >= floor)
    worst = -math.inf if mode == "max" else math.inf
    return (raw if feasible and not math.isnan(raw) else worst), feasible


class GuardedTuneReport(TuneReportCallback):
    """Forward rank 0's evaluation reports to Tune with :data:`SCORE_KEY` and :data:`FEASIBLE_KEY`
    added. Checkpoint-only reports carry no evaluation and are not forwarded, so every Tune
    iteration is one held-out evaluation (ASHA's time unit)."""

    def __init__(self, objective: str, mode: str, helpfulness_floor: float) -> None:
        super().__init__()
        self.objective, self.mode, self.floor = objective, mode, helpfulness_floor

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        first = metrics[0]
        if not any(key.startswith("eval/") for key in first):
            return
        score, feasible = guarded_score(first, self.objective, self.mode, self.floor)
        row = {**first, SCORE_KEY: score, FEASIBLE_KEY: 1.0 if feasible else 0.0}
        super().after_report(run_context, [row, *metrics[1:]], checkpoint)


# ---------------------------------------------------------------------------------------------
# placement groups of stopped trials
#
# When ASHA stops a trial, Tune ends the trial's actor and, with it, the Train controller it owns.
# The controller's placement group outlives it (it belongs to the job); Ray Train's detached
# PlacementGroupCleaner frees it only where the State API answers (a dashboard, one Ray instance
# per machine). Where it does not, every stopped trial would keep its CPUs/GPUs reserved and the
# next trials would wait forever. So each run logs its placement groups and the sweep driver frees
# those of trials that are over.


class PlacementGroupLog(WorkerGroupCallback):
    """Train-controller callback: append the id of every placement group the run's worker group
    starts in to ``path`` (a restarted worker group gets a new one)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def after_worker_group_start(self, worker_group: Any) -> None:
        pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
        with open(self.path, "a") as fh:
            fh.write(pg.id.hex() + "\n")


def release_placement_groups(log: Path) -> int:
    """Remove every placement group listed in ``log`` that still exists; returns how many.
    Only for runs that are over: removing a live run's group kills its workers."""
    from ray import PlacementGroupID
    from ray.util import placement_group_table
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    if not log.exists():
        return 0
    released = 0
    for line in log.read_text().split():
        pg = PlacementGroup(PlacementGroupID(bytes.fromhex(line)))
        if placement_group_table(pg).get("state", "REMOVED") != "REMOVED":
            remove_placement_group(pg)
            released += 1
    return released


class ReleaseEndedTrials(ray_tune.Callback):
    """Tune callback (sweep driver): a few seconds after a trial ends -- finished, stopped by ASHA or
    failed -- free what its Train run still holds, and keep checking for a minute in case a
    dying controller restarted its worker group."""

    def __init__(self, trials_dir: Path, axes: Sequence[str], grace_s: float = 5.0, watch_s: float = 60.0) -> None:
        self.trials_dir, self.axes, self.grace_s, self.watch_s = trials_dir, list(axes), grace_s, watch_s
        self._ended: dict[str, float] = {}

    def _end(self, trial: Any) -> None:
        self._ended[trial_name({k: trial.config[k] for k in self.axes}, trial.trial_id)] = time.monotonic()

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._end(trial)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._end(trial)

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        now = time.monotonic()
        for name, ended in list(self._ended.items()):
            if now - ended < self.grace_s:
                continue
            if release_placement_groups(self.trials_dir / name / PLACEMENT_GROUP_LOG):
                print(f"[tune] freed the resources {name} still held after it ended", flush=True)
            if now - ended > self.watch_s:
                del self._ended[name]


# ---------------------------------------------------------------------------------------------
# the trial (a Ray Train driver function run by Tune)


def _plain(value: Any) -> Any:
    """numpy scalars (from Tune samplers) -> Python scalars, which the config validation expects."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict, str)) else value


def trial_name(params: Mapping[str, Any], trial_id: str) -> str:
    """``eta0.25-eps0.02[-beta0.1]-<trial id>``: readable and unique per sweep."""
    short = {"dual.eta": "eta", "dual.epsilon": "eps"}
    parts = [f"{short.get(k, k.split('.')[-1])}{_plain(v):.4g}" if isinstance(_plain(v), float)
             else f"{short.get(k, k.split('.')[-1])}{_plain(v)}" for k, v in params.items()]
    return "-".join([*parts, trial_id]).replace("/", "_").replace(" ", "")


def _trial(params: dict[str, Any], *, base: dict[str, Any], data: Any, trials_dir: str, storage: str) -> None:
    """Tune trainable: one TorchTrainer run on the shared, already tokenized data."""
    import ray.data
    import ray.tune

    from catdpo_ray.train.driver import fit_run

    ray.data.DataContext.get_current().enable_progress_bars = False
    name = ray.tune.get_context().get_trial_name()
    overrides = {k: _plain(v) for k, v in params.items()}
    cfg = from_dict(base).replace({**overrides, "output.dir": trials_dir, "output.name": name,
                                   "output.storage_path": storage})
    run_dir = Path(trials_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    callbacks = [GuardedTuneReport(cfg.tune.objective, cfg.tune.mode, cfg.tune.helpfulness_floor),
                 PlacementGroupLog(str(run_dir / PLACEMENT_GROUP_LOG))]
    result = fit_run(cfg, data, run_dir, name, callbacks=callbacks)
    if result.error is not None:
        raise RuntimeError(f"trial {name} failed: {result.summary.get('error')}") from result.error


# ---------------------------------------------------------------------------------------------
# the sweep


@dataclass
class SweepResult:
    """What :func:`run_sweep` leaves behind (all paths inside ``sweep_dir``)."""

    sweep_dir: Path
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_config: Path | None
    wall_time_s: float


def _sweep_name(cfg: RunConfig) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return cfg.tune.name or f"sweep-{cfg.loss.name}-{stamp}-{secrets.token_hex(2)}"


def run_sweep(cfg: RunConfig) -> SweepResult:
    """``catdpo-ray tune``: tokenize once, run the Tuner, write the table, best config and heat map."""
    import ray
    from ray import tune

    from catdpo_ray.train.driver import init_ray, plan_steps, prepare_data

    t0 = time.perf_counter()
    axes = search_axes(cfg)
    check_axes(cfg, axes)
    sweep_dir = Path(cfg.output.dir).resolve() / _sweep_name(cfg)
    if sweep_dir.exists() and any(sweep_dir.iterdir()):
        raise ConfigError(f"tune.name={cfg.tune.name!r}: {sweep_dir} already holds a sweep; choose another name "
                          "(or leave tune.name unset for a unique one)")
    trials_dir = sweep_dir / "trials"
    trials_dir.mkdir(parents=True, exist_ok=True)
    storage = f"{cfg.output.storage_path.rstrip('/')}/{sweep_dir.name}" if cfg.output.storage_path else str(sweep_dir / "ray")

    init_ray(cfg)
    data = prepare_data(cfg, sweep_dir)
    (sweep_dir / "data_report.json").write_text(json.dumps(data.report, indent=2))
    _, total_steps = plan_steps(cfg, data.num_train_pairs)
    if cfg.tune.asha and cfg.train.eval_every == 0:
        # ASHA compares trials at intermediate evaluations; with only a final one it could stop nothing.
        cfg = cfg.replace({"train.eval_every": max(1, math.ceil(total_steps / DEFAULT_EVALS_PER_TRIAL))})
        print(f"[tune] train.eval_every=0: evaluating every {cfg.train.eval_every} steps so ASHA has rungs")
    (sweep_dir / "sweep_config.yaml").write_text(to_yaml(cfg))
    max_evals = evals_per_trial(total_steps, cfg.train.eval_every)
    trials = num_trials(cfg, axes)
    cluster = ray.cluster_resources()
    concurrency = trial_concurrency(cfg, cluster, trials)
    sc = cfg.scaling
    if sc.num_workers > 0 and (cluster.get("CPU", 0.0) < sc.num_workers * sc.cpus_per_worker
                               or (sc.use_gpu and cluster.get("GPU", 0.0) < sc.num_workers)):
        print(f"[tune] WARNING: one trial needs {sc.num_workers} worker(s) x {sc.cpus_per_worker} CPU"
              f"{' + 1 GPU' if sc.use_gpu else ''} but the cluster has {cluster.get('CPU', 0)} CPU / "
              f"{cluster.get('GPU', 0)} GPU now; trials wait until an autoscaler adds nodes", flush=True)
    print(f"[tune] {trials} trial(s) over {', '.join(f'{k} {v}' for k, v in axes.items())} ({cfg.tune.search}); "
          f"{concurrency} at once; {total_steps} steps and {max_evals} evaluation(s) per trial; "
          f"objective {cfg.tune.objective} ({cfg.tune.mode}), helpfulness floor {cfg.tune.helpfulness_floor}%; "
          f"sweep {sweep_dir}", flush=True)

    trainable = tune.with_parameters(_trial, base=cfg.to_dict(), data=data, trials_dir=str(trials_dir), storage=storage)
    tuner = tune.Tuner(
        tune.with_resources(trainable, trial_driver_resources(cfg)),
        param_space=param_space(cfg, axes),
        tune_config=tune.TuneConfig(
            metric=SCORE_KEY, mode=cfg.tune.mode, search_alg=make_searcher(cfg, concurrency),
            scheduler=make_scheduler(cfg, max_evals), num_samples=cfg.tune.num_samples,
            max_concurrent_trials=concurrency if cfg.tune.search == "optuna" else None,
            trial_name_creator=lambda t: trial_name({k: t.config[k] for k in axes}, t.trial_id),
            trial_dirname_creator=lambda t: trial_name({k: t.config[k] for k in axes}, t.trial_id),
        ),
        run_config=tune.RunConfig(name="tune", storage_path=storage,
                                  callbacks=[ReleaseEndedTrials(trials_dir, list(axes))]),
    )
    grid = tuner.fit()
    for log in trials_dir.glob(f"*/{PLACEMENT_GROUP_LOG}"):  # every trial is over now
        release_placement_groups(log)
    rows = collect_rows(grid, axes, trials_dir, cfg)
    result = write_sweep_outputs(sweep_dir, cfg, axes, rows, wall_time_s=time.perf_counter() - t0,
                                 extra={"concurrency": concurrency, "total_steps": total_steps,
                                        "evals_per_trial": max_evals, "num_train_pairs": data.num_train_pairs,
                                        "num_test_pairs": data.num_test_pairs})
    print(f"[tune] done in {result.wall_time_s:.0f}s; results: {sweep_dir / 'results.md'}")
    if result.best is not None:
        print(f"[tune] best: {', '.join(f'{k}={result.best[k]}' for k in axes)} -> {cfg.tune.objective} "
              f"{result.best['objective']:.2f} (feasible: {bool(result.best['feasible'])}); "
              f"train it with: catdpo-ray train --config {result.best_config}")
    return result


# ---------------------------------------------------------------------------------------------
# results: table, best config, heat map

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
        ax.set_xscale("log")
        ax.set_yscale("log")
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
        run_dir = Path(row["run_dir"])
        if run_dir.is_dir():
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


__all__ = [
    "DEFAULT_SWEEP_OVERRIDES",
    "FEASIBLE_KEY",
    "SCORE_KEY",
    "GuardedTuneReport",
    "SweepResult",
    "guarded_score",
    "load_sweep_config",
    "param_space",
    "run_sweep",
    "search_axes",
    "trial_concurrency",
]
