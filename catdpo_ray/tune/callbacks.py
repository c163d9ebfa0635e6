"""Tune and Train callbacks of a sweep: the guarded objective reported to Tune, and the release
of what stopped trials still hold."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ray import tune as ray_tune
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.tune.integration.ray_train import TuneReportCallback

#: Result keys added to every evaluation report: the guarded score (what Tune and ASHA rank) and
#: 1.0/0.0 for the helpfulness guard.
SCORE_KEY = "sweep/score"
FEASIBLE_KEY = "sweep/feasible"
#: File in each trial's run directory listing the placement groups its Train run reserved.
PLACEMENT_GROUP_LOG = "placement_groups.txt"


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



def _plain(value: Any) -> Any:
    """numpy scalars (from Tune samplers) -> Python scalars, which the config validation expects."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict, str)) else value


def trial_name(params: Mapping[str, Any], trial_id: str) -> str:
    """``eta0.25-eps0.02[-beta0.1]-<trial id>``: readable and unique per sweep."""
    short = {"dual.eta": "eta", "dual.epsilon": "eps"}
    parts = [f"{short.get(k, k.split('.')[-1])}{_plain(v):.4g}" if isinstance(_plain(v), float)
             else f"{short.get(k, k.split('.')[-1])}{_plain(v)}" for k, v in params.items()]
    return "-".join([*parts, trial_id]).replace("/", "_").replace(" ", "")
