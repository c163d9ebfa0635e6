"""The trial (a Ray Train driver function run by Tune) and the sweep driver, :func:`run_sweep`."""

from __future__ import annotations

import json
import math
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from catdpo_ray.config import ConfigError, RunConfig, from_dict, to_yaml
from catdpo_ray.tune.callbacks import (
    PLACEMENT_GROUP_LOG,
    SCORE_KEY,
    GuardedTuneReport,
    PlacementGroupLog,
    ReleaseEndedTrials,
    _plain,
    release_placement_groups,
    trial_name,
)
from catdpo_ray.tune.results import SweepResult, collect_rows, write_sweep_outputs
from catdpo_ray.tune.space import (
    DEFAULT_EVALS_PER_TRIAL,
    check_axes,
    evals_per_trial,
    make_scheduler,
    make_searcher,
    num_trials,
    param_space,
    search_axes,
    trial_concurrency,
    trial_driver_resources,
)


def _trial(params: dict[str, Any], *, base: dict[str, Any], data: Any, trials_dir: str, storage: str) -> None:
    """Tune trainable: one TorchTrainer run on the shared, already tokenized data."""
    import ray.data
    import ray.tune

    from catdpo_ray.train.driver import fit_run

    ctx = ray.data.DataContext.get_current()  # a trial actor does not inherit the sweep driver's context
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True  # same seed, same batches (as in catdpo-ray train)
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


def _sweep_name(cfg: RunConfig) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return cfg.tune.name or f"sweep-{cfg.loss.name}-{stamp}-{secrets.token_hex(2)}"


def run_sweep(cfg: RunConfig) -> SweepResult:
    """``catdpo-ray tune``: tokenize once, run the Tuner, write the table, best config and heat map."""
    import ray
    from ray import tune

    from catdpo_ray.config_locations import check_paths
    from catdpo_ray.train.driver import init_ray, storage_location
    from catdpo_ray.train.prepare import load_pairs, plan_steps, prepare_data

    t0 = time.perf_counter()
    axes = search_axes(cfg)
    check_axes(cfg, axes)
    check_paths(cfg)
    sweep_dir = Path(cfg.output.dir).resolve() / _sweep_name(cfg)
    if sweep_dir.exists() and any(sweep_dir.iterdir()):
        raise ConfigError(f"tune.name={cfg.tune.name!r}: {sweep_dir} already holds a sweep; choose another name "
                          "(or leave tune.name unset for a unique one)")
    trials_dir = sweep_dir / "trials"
    trials_dir.mkdir(parents=True, exist_ok=True)
    storage = f"{storage_location(cfg)}/{sweep_dir.name}" if cfg.output.storage_path else str(sweep_dir / "ray")

    loaded = load_pairs(cfg, sweep_dir)  # bad or empty data files are reported before Ray starts
    init_ray(cfg)
    data = prepare_data(cfg, sweep_dir, loaded=loaded)
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
    else:
        failed = sum(r["status"] == "error" for r in rows)
        print(f"[tune] no trial reported a score ({failed} of {len(rows)} failed); see {sweep_dir / 'results.md'} "
              "and the trial directories", flush=True)
    return result
