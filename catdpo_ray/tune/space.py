"""Search space, schedulers and trial concurrency of a sweep (``tune.*`` config section)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from catdpo_ray.config import ConfigError, RunConfig, load_config

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
    # train.shuffle orders the pairs on the driver with Random(train.seed) before tokenization
    shuffle = (True, cfg.train.seed) if cfg.train.shuffle else (False,)
    return (cfg.data, m.name_or_path, m.revision, m.tokenizer, m.trust_remote_code, cfg.pair_mode,
            cfg.loss.name == "catdpo", shuffle)


def check_axes(cfg: RunConfig, axes: Mapping[str, list[Any]]) -> None:
    """Every value must give a valid config whose tokenized data equals the base config's."""
    base_key = _data_key(cfg)
    _check_trial(cfg, "")
    for key, values in axes.items():
        for value in values:
            trial = cfg.replace({key: value})  # raises ConfigError naming the key
            _check_trial(trial, f" with {key}={value!r}")
            if _data_key(trial) != base_key:
                raise ConfigError(
                    f"sweep axis {key}={value!r} changes the tokenized data; a sweep tokenizes once and shares the "
                    "data between trials, so data.*, the model/tokenizer, the pair construction and (with train.shuffle) "
                    "train.seed, which orders the pairs before tokenization, cannot be swept"
                )


def _check_trial(cfg: RunConfig, where: str) -> None:
    """A trial is scored by its held-out evaluations: one that never evaluates gives Tune no score.
    And a trial trains through Ray Train workers: Ray 2.60 refuses ``ray.train.get_checkpoint`` /
    ``report`` in a Tune trial's own process (ray#49454), which is where local mode would train."""
    if cfg.scaling.num_workers < 1:
        raise ConfigError(f"a sweep trial{where} needs scaling.num_workers >= 1 (got {cfg.scaling.num_workers}): "
                          "Ray Train's local mode cannot run inside a Ray Tune trial (Ray refuses its ray.train "
                          "calls there, ray#49454); use scaling.num_workers=1 for one worker per trial")
    if not (cfg.train.eval_before_after or cfg.train.eval_every):
        raise ConfigError(f"a sweep trial{where} never evaluates (train.eval_before_after=false and "
                          "train.eval_every=0), so it reports no score: set one of them")


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
    workers hold their own CPUs/GPUs), just memory, since Tune needs a non-empty request. (Sweeps
    refuse local mode: :func:`check_axes`.)"""
    return {"CPU": 0.0, "memory": float(TRIAL_DRIVER_MEMORY)}


def trial_concurrency(cfg: RunConfig, cluster: Mapping[str, float], trials: int) -> int:
    """Trials at once: ``tune.max_concurrent``, or as many TorchTrainers as the cluster's CPUs (and
    GPUs) hold at once (the trial drivers add no CPU, see :func:`trial_driver_resources`)."""
    if cfg.tune.max_concurrent > 0:
        return max(1, min(cfg.tune.max_concurrent, trials))
    sc = cfg.scaling
    cpus = sc.cpus_per_worker * sc.num_workers
    fit = int(cluster.get("CPU", 0.0) // cpus) if cpus > 0 else trials
    if sc.use_gpu:
        fit = min(fit, int(cluster.get("GPU", 0.0) // sc.num_workers))
    return max(1, min(fit, trials))
