"""Ray Tune sweep over ``dual.eta`` x ``dual.epsilon`` (and any other key): ``catdpo-ray tune``.

Ray Train V2 pattern (Ray >= 2.51; ``Tuner(trainer)`` is gone): the Tune trainable is a *driver
function*, :func:`_trial`, that builds one ``TorchTrainer`` per trial through
:func:`catdpo_ray.train.driver.fit_run`. Worker reports reach Tune through
:class:`GuardedTuneReport`, a ``TuneReportCallback`` that adds the guarded score to each held-out
evaluation.

:func:`run_sweep`:

1. resolves the search axes (``tune.eta``, ``tune.epsilon``, ``tune.extra``) and checks that every
   value gives a valid config that needs the same tokenized data as the base config;
2. tokenizes **once** on the driver (:func:`~catdpo_ray.train.prepare.prepare_data`) and hands the
   materialised datasets to every trial through ``tune.with_parameters`` (the object store);
3. runs a ``Tuner`` (grid | random | Optuna), ASHA on the guarded score, at most as many trials at
   once as the cluster has CPUs/GPUs for;
4. writes ``results.csv``, ``results.md``, ``best_config.yaml`` and ``heatmap.png``.

Guarded objective: a trial's score is ``tune.objective`` (default ``eval/worst3``, held-out Worst-3
per-category preference accuracy, percent) while ``eval/helpful_acc`` (implicit-reward accuracy on
the both-safe pairs, percent) is at least ``tune.helpfulness_floor``; below the floor the trial is
*infeasible* and scores -inf (``mode=max``) or +inf (``mode=min``), so it ranks last and ASHA stops
it at its next rung.

Modules: :mod:`~catdpo_ray.tune.space` (axes, search space, ASHA, concurrency),
:mod:`~catdpo_ray.tune.callbacks` (guarded report, placement-group release),
:mod:`~catdpo_ray.tune.sweep` (the trial and :func:`run_sweep`), :mod:`~catdpo_ray.tune.results`
(table, best config, heat map).
"""

from __future__ import annotations

from catdpo_ray.tune.results import SweepResult
from catdpo_ray.tune.space import DEFAULT_SWEEP_OVERRIDES, load_sweep_config
from catdpo_ray.tune.sweep import run_sweep

__all__ = ["DEFAULT_SWEEP_OVERRIDES", "SweepResult", "load_sweep_config", "run_sweep"]
