"""The sweep: search space, guarded objective, ASHA rungs, concurrency, outputs, and a real
2-trial sweep that proves the data are tokenized once for all trials."""

from __future__ import annotations

import json
import math
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from catdpo_ray.config import ConfigError, load_config
from catdpo_ray.tune.callbacks import (
    FEASIBLE_KEY,
    PLACEMENT_GROUP_LOG,
    SCORE_KEY,
    guarded_score,
    release_placement_groups,
    trial_name,
)
from catdpo_ray.tune.results import pick_best, write_sweep_outputs
from catdpo_ray.tune.space import (
    DEFAULT_SWEEP_OVERRIDES,
    check_axes,
    evals_per_trial,
    load_sweep_config,
    make_scheduler,
    num_trials,
    param_space,
    search_axes,
    trial_concurrency,
    trial_driver_resources,
)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# guarded objective


def test_guarded_score_feasible_returns_objective() -> None:
    metrics = {"eval/worst3": 71.5, "eval/helpful_acc": 60.0}
    assert guarded_score(metrics, "eval/worst3", "max", 55.0) == (71.5, True)


def test_guarded_score_below_floor_ranks_last_in_either_mode() -> None:
    """helpful 54.9 < floor 55: -inf when maximising, +inf when minimising (e.g. eval/gap)."""
    metrics = {"eval/worst3": 99.0, "eval/gap": 1.0, "eval/helpful_acc": 54.9}
    assert guarded_score(metrics, "eval/worst3", "max", 55.0) == (-math.inf, False)
    assert guarded_score(metrics, "eval/gap", "min", 55.0) == (math.inf, False)


def test_guarded_score_floor_zero_accepts_missing_helpfulness_and_nan_is_worst() -> None:
    assert guarded_score({"eval/worst3": 40.0}, "eval/worst3", "max", 0.0) == (40.0, True)
    assert guarded_score({"eval/worst3": 40.0}, "eval/worst3", "max", 10.0) == (-math.inf, False)
    assert guarded_score({"eval/worst3": float("nan")}, "eval/worst3", "max", 0.0) == (-math.inf, True)


def test_guarded_score_names_a_missing_objective() -> None:
    with pytest.raises(KeyError, match="eval/wrost3"):
        guarded_score({"eval/worst3": 1.0}, "eval/wrost3", "max", 0.0)


# ---------------------------------------------------------------------------------------------
# search space


def test_axes_are_eta_epsilon_then_extra_and_grid_counts_every_combination() -> None:
    cfg = load_config(None, ["tune.eta=[0.1, 0.5, 2.0]", "tune.epsilon=[0.0, 0.05]",
                             "tune.extra={loss.beta: [0.05, 0.1]}", "tune.num_samples=2"])
    axes = search_axes(cfg)
    assert list(axes) == ["dual.eta", "dual.epsilon", "loss.beta"]
    check_axes(cfg, axes)
    assert num_trials(cfg, axes) == 3 * 2 * 2 * 2
    space = param_space(cfg, axes)
    assert space["dual.eta"] == {"grid_search": [0.1, 0.5, 2.0]}


def test_random_and_optuna_turn_float_lists_into_ranges_and_other_lists_into_choices() -> None:
    from ray.tune.search.sample import Categorical, Float

    cfg = load_config(None, ["tune.search=random", "tune.eta=[0.1, 2.0]", "tune.epsilon=[0.0, 0.1]",
                             "tune.extra={train.grad_accum: [1, 2]}", "tune.num_samples=5"])
    space = param_space(cfg, search_axes(cfg))
    assert isinstance(space["dual.eta"], Float) and (space["dual.eta"].lower, space["dual.eta"].upper) == (0.1, 2.0)
    assert isinstance(space["dual.eta"].sampler, Float._LogUniform)  # all positive -> log scale
    assert not isinstance(space["dual.epsilon"].sampler, Float._LogUniform)  # contains 0 -> uniform
    assert isinstance(space["train.grad_accum"], Categorical)
    assert num_trials(cfg, search_axes(cfg)) == 5


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("{loss.betta: [0.1]}", "loss.betta"),  # unknown key, named
        ("{train.micro_batch_size: [0]}", "micro_batch_size"),  # invalid value, named
        ("{data.max_length: [96, 128]}", "tokenized data"),  # would need a re-tokenization
        ("{model.name_or_path: [gpt2]}", "tokenized data"),
        ("{dual.eta: [1.0]}", "tune.eta"),  # eta and epsilon have their own lists
        ("{train.seed: [0, 1]}", "train.seed"),  # with train.shuffle it orders the pairs before tokenization
        ("{train.shuffle: [true, false]}", "tokenized data"),
        # a trial that never evaluates reports no score (Tune would fail later, naming no key)
        ("{train.eval_before_after: [false]}", r"sweep trial with train.eval_before_after=False never evaluates"),
        # Ray refuses ray.train calls from a Tune trial's own process, where local mode would train
        ("{scaling.num_workers: [0]}", r"sweep trial with scaling.num_workers=0 needs scaling.num_workers >= 1 \(got 0\)"),
    ],
)
def test_axes_that_cannot_be_swept_fail_at_load_with_the_key(extra: str, message: str) -> None:
    cfg = load_config(None, [f"tune.extra={extra}"])
    with pytest.raises(ConfigError, match=message):
        check_axes(cfg, search_axes(cfg))


def test_seed_is_sweepable_without_shuffle() -> None:
    cfg = load_config(None, ["train.shuffle=false", "tune.extra={train.seed: [0, 1]}"])
    check_axes(cfg, search_axes(cfg))  # file order: the seed no longer changes the tokenized data


def test_trial_names_are_readable_and_unique() -> None:
    assert trial_name({"dual.eta": 0.25, "dual.epsilon": 0.02}, "ab12_00003") == "eta0.25-eps0.02-ab12_00003"
    assert trial_name({"dual.eta": 1.0, "dual.epsilon": 0.1, "loss.beta": 0.05}, "x_1") == "eta1-eps0.1-beta0.05-x_1"


# ---------------------------------------------------------------------------------------------
# ASHA and concurrency


@pytest.mark.parametrize(("total", "every", "evals"), [(20, 5, 4), (22, 5, 5), (40, 10, 4), (20, 0, 1), (3, 10, 1)])
def test_evals_per_trial_matches_the_worker_loop(total: int, every: int, evals: int) -> None:
    """Worker: an eval every ``every`` steps strictly before the last step, plus the final one."""
    expected = len([s for s in range(1, total) if every and s % every == 0]) + 1
    assert evals_per_trial(total, every) == evals == expected


def test_asha_never_decides_at_a_trials_last_evaluation() -> None:
    """Rungs lie strictly below the last evaluation, so a finishing trial is never killed while it
    writes its run directory; with a single evaluation there is nothing to compare (FIFO)."""
    cfg = load_config(None, ["tune.asha_grace_period=2"])
    sched = make_scheduler(cfg, max_evals=4)
    assert sched._max_t == 3 and sched._stop_last_trials is False
    milestones = [m for bracket in sched._brackets for m, _ in bracket._rungs]
    assert milestones and max(milestones) < 4 and min(milestones) == 2
    assert make_scheduler(cfg, max_evals=1) is None
    assert make_scheduler(load_config(None, ["tune.asha=false"]), max_evals=4) is None


@pytest.mark.parametrize(
    ("overrides", "cluster", "trials", "expected"),
    [
        (["scaling.num_workers=1"], {"CPU": 2.0}, 4, 2),  # this machine, default sweep
        (["scaling.num_workers=2"], {"CPU": 2.0}, 4, 1),  # 2-worker trials: one at a time
        (["scaling.num_workers=4", "scaling.use_gpu=true", "scaling.cpus_per_worker=6"],
         {"CPU": 192.0, "GPU": 16.0}, 9, 4),  # 2 nodes x 8 GPUs, 4-GPU trials
        (["scaling.num_workers=8", "scaling.use_gpu=true"], {"CPU": 192.0, "GPU": 8.0}, 9, 1),
        (["scaling.num_workers=1"], {"CPU": 64.0}, 3, 3),  # never more than there are trials
        (["scaling.num_workers=1", "tune.max_concurrent=1"], {"CPU": 64.0}, 4, 1),  # explicit cap
    ],
)
def test_concurrency_follows_workers_per_trial_and_cluster(overrides: list[str], cluster: dict[str, float],
                                                          trials: int, expected: int) -> None:
    assert trial_concurrency(load_config(None, overrides), cluster, trials) == expected


def test_trial_driver_holds_no_cpu_and_local_mode_is_refused_before_ray() -> None:
    assert trial_driver_resources(load_config(None, ["scaling.num_workers=2"]))["CPU"] == 0.0
    cfg = load_sweep_config(None, ["scaling.num_workers=0"])
    with pytest.raises(ConfigError, match=r"^a sweep trial needs scaling.num_workers >= 1 \(got 0\): Ray Train's local "
                                          r"mode cannot run inside a Ray Tune trial"):
        check_axes(cfg, search_axes(cfg))


def test_embedded_default_sweep_is_jobs_sweep_tiny_cpu() -> None:
    """``catdpo-ray tune`` (no --config) and ``--config jobs/sweep_tiny_cpu.yaml`` are one sweep."""
    embedded = load_sweep_config(None)
    assert embedded == load_config(REPO / "jobs" / "sweep_tiny_cpu.yaml")
    assert len(embedded.tune.eta) * len(embedded.tune.epsilon) == 4
    assert embedded.scaling.num_workers == 1 and embedded.model.name_or_path == "tiny"
    assert load_sweep_config(None, ["tune.eta=[1.0]"]).tune.eta == [1.0]  # overrides still apply
    assert load_sweep_config(REPO / "jobs" / "tiny_cpu.yaml").train.max_steps is None  # a file wins
    assert all("=" in o for o in DEFAULT_SWEEP_OVERRIDES)


def test_a_named_sweep_never_writes_into_an_earlier_one(tmp_path: Path) -> None:
    from catdpo_ray.tune import run_sweep

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "results.csv").write_text("earlier\n")
    with pytest.raises(ConfigError, match="already holds a sweep"):
        run_sweep(load_sweep_config(None, [f"output.dir={tmp_path}", "tune.name=mine"]))


# ---------------------------------------------------------------------------------------------
# outputs


def _row(eta: float, eps: float, worst3: float, helpful: float, *, floor: float, status: str = "finished",
         evals: int = 4, run_dir: str = "") -> dict[str, Any]:
    score, feasible = guarded_score({"eval/worst3": worst3, "eval/helpful_acc": helpful}, "eval/worst3", "max", floor)
    return {"trial": f"eta{eta:g}-eps{eps:g}", "dual.eta": eta, "dual.epsilon": eps, "score": score,
            "objective": worst3, "feasible": feasible, "eval/macro": 90.0, "eval/gap": 10.0,
            "eval/helpful_acc": helpful, "evals": evals, "step": 40, "status": status, "run_dir": run_dir}


def test_outputs_table_best_config_and_heatmap(tmp_path: Path) -> None:
    """The highest Worst-3 (95) is below the helpfulness floor, so the best is the feasible 80."""
    cfg = load_sweep_config(None, ["tune.helpfulness_floor=50"])
    axes = search_axes(cfg)
    rows = [
        _row(0.25, 0.02, 80.0, 60.0, floor=50),
        _row(0.25, 0.1, 95.0, 40.0, floor=50),
        _row(1.0, 0.02, 70.0, 70.0, floor=50, status="stopped early (ASHA)", evals=2),
        _row(1.0, 0.1, 75.0, 55.0, floor=50),
    ]
    result = write_sweep_outputs(tmp_path, cfg, axes, rows, wall_time_s=12.0)
    assert result.best is not None and result.best["trial"] == "eta0.25-eps0.02"
    best_cfg = load_config(result.best_config)  # what `catdpo-ray train --config` does
    assert (best_cfg.dual.eta, best_cfg.dual.epsilon) == (0.25, 0.02)
    assert best_cfg.model == cfg.model and best_cfg.train == cfg.train
    csv_text = (tmp_path / "results.csv").read_text()
    assert csv_text.splitlines()[0].startswith("trial,dual.eta,dual.epsilon,score,objective,feasible")
    assert "-inf" in csv_text  # the infeasible trial's score
    md = (tmp_path / "results.md").read_text()
    assert "| 0.25 | 80 | 95 (infeasible) |" in md and "70 (ASHA stop @ eval 2)" in md
    assert (tmp_path / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "sweep.json").read_text())  # standard JSON: -inf written as a string
    assert summary["best"]["dual.eta"] == 0.25


def test_a_sweep_whose_trials_all_failed_still_writes_its_outputs(tmp_path: Path) -> None:
    cfg = load_sweep_config(None)
    failed = {"score": -math.inf, "objective": math.nan, "feasible": False, "status": "error", "evals": 0}
    rows = [_row(0.25, 0.02, 0.0, 0.0, floor=0) | failed, _row(1.0, 0.1, 0.0, 0.0, floor=0) | failed]
    result = write_sweep_outputs(tmp_path, cfg, search_axes(cfg), rows, wall_time_s=1.0)
    assert result.best is None  # the CLI exits 1
    assert (tmp_path / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # no log scale over nothing
    assert (tmp_path / "results.csv").read_text().count("error") == 2


def test_best_ties_break_on_macro_and_all_infeasible_falls_back_to_raw_objective(tmp_path: Path) -> None:
    a, b = _row(0.25, 0.02, 80.0, 60.0, floor=0), _row(0.25, 0.1, 80.0, 60.0, floor=0)
    b["eval/macro"] = 91.0
    assert pick_best([a, b], "max") is b
    rows = [_row(0.25, 0.02, 80.0, 10.0, floor=50), _row(1.0, 0.02, 85.0, 20.0, floor=50)]
    cfg = load_sweep_config(None, ["tune.helpfulness_floor=50"])
    result = write_sweep_outputs(tmp_path, cfg, search_axes(cfg), rows, wall_time_s=1.0)
    assert result.best is not None and result.best["dual.eta"] == 1.0 and not result.best["feasible"]
    assert "no trial met the helpfulness floor" in (tmp_path / "results.md").read_text()
    assert "feasible: False" in result.best_config.read_text()


def test_random_search_heatmap_is_a_scatter(tmp_path: Path) -> None:
    cfg = load_sweep_config(None, ["tune.search=random", "tune.num_samples=3"])
    rows = [_row(0.3, 0.05, 80.0, 60.0, floor=0), _row(0.7, 0.03, 82.0, 60.0, floor=0),
            _row(0.4, 0.08, 81.0, 60.0, floor=0)]
    write_sweep_outputs(tmp_path, cfg, search_axes(cfg), rows, wall_time_s=1.0)
    assert (tmp_path / "heatmap.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------------------
# real sweeps in one Ray session: tokenized once, the reference stage scored once

#: Installed by Ray in every worker process of the test's job (reference actors, Tune trial drivers,
#: Train workers; the fixture wraps the test's own process the same way): each call of the real
#: PairTokenizer / ReferenceScorer appends "<pid> <rows>" to its own file.
_COUNT_HOOK = '''
import os


def _count(cls, env: str) -> None:
    original = cls.__call__

    def counted(self, batch):
        out = original(self, batch)
        with open(os.environ[env], "a") as fh:
            fh.write(f"{os.getpid()} {len(next(iter(batch.values())))}\\n")
        return out

    cls.__call__ = counted


def install() -> None:
    from catdpo_ray.data.reference import ReferenceScorer
    from catdpo_ray.data.tokenize import PairTokenizer

    _count(PairTokenizer, "CATDPO_TOKENIZE_COUNTER")
    _count(ReferenceScorer, "CATDPO_REFERENCE_COUNTER")
'''


def _tokenized_rows(counter: Path) -> int:
    return sum(int(line.split()[1]) for line in counter.read_text().splitlines())


@pytest.fixture
def counting_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    """A Ray session whose workers count the rows they tokenize and reference-score, and this process
    the same (the sweep driver's data preparation): (tokenize, reference)."""
    import os

    import ray

    from catdpo_ray.data.reference import ReferenceScorer
    from catdpo_ray.data.tokenize import PairTokenizer

    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "catdpo_count_hook.py").write_text(textwrap.dedent(_COUNT_HOOK))
    counters = (tmp_path / "tokenize_rows.txt", tmp_path / "reference_rows.txt")
    for c in counters:
        c.write_text("")

    def count(cls: type, counter: Path) -> None:
        original = cls.__call__

        def counted(self: Any, batch: dict[str, Any]) -> dict[str, Any]:
            out = original(self, batch)
            with counter.open("a") as fh:
                fh.write(f"{os.getpid()} {len(next(iter(batch.values())))}\n")
            return out

        monkeypatch.setattr(cls, "__call__", counted)

    count(PairTokenizer, counters[0])
    count(ReferenceScorer, counters[1])  # a CPU sweep scores a cache miss in its driver: this process
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", runtime_env={
        "worker_process_setup_hook": "catdpo_count_hook.install",
        "env_vars": {"PYTHONPATH": str(hook_dir), "CATDPO_TOKENIZE_COUNTER": str(counters[0]),
                     "CATDPO_REFERENCE_COUNTER": str(counters[1])},
    })
    try:
        yield counters
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_sweeps_tokenize_and_score_once_stop_early_and_free_everything(
        tmp_path: Path, tiny_model_dir: str, counting_ray: tuple[Path, Path]) -> None:
    """Sweep 1: two trials, one after the other: ``train.lr`` 5e-4, then 0. With lr 0 the policy stays the
    reference, so its implicit reward is exactly 0 on every pair: helpfulness 0 % < the 1 % floor,
    infeasible, score -inf, and ASHA stops it at its first evaluation (rung 1) -- deterministic.
    Sweep 2: two trials at once on precomputed reference log-probs: the stage scored every pair once
    (cold cache; in the sweep's driver, a CPU run), and a later data preparation over the same data
    reads the cache and scores none."""
    from ray.util import placement_group_table
    from ray.util.placement_group import placement_group

    from catdpo_ray.train.driver import prepare_data
    from catdpo_ray.tune import run_sweep

    counter, ref_counter = counting_ray
    cfg = load_sweep_config(None, [
        f"model.name_or_path={tiny_model_dir}", "data.max_train_rows=96", "data.max_test_rows=48",
        "tune.eta=[0.25]", "tune.epsilon=[0.05]", "tune.extra={train.lr: [0.0005, 0.0]}", "tune.max_concurrent=1",
        "train.max_steps=4", "train.eval_every=2", "tune.asha_grace_period=1", "tune.objective=eval/implicit_macro",
        "tune.helpfulness_floor=1.0", f"output.dir={tmp_path / 'out'}", "tune.name=sw", "logging.tensorboard=false",
        # lr 0 must leave the implicit reward exactly 0: an online reference pass computes the very same
        # forward as the policy's (a precomputed one agrees only within float tolerance; sweep 2 uses one).
        "model.reference=online", "train.packing=off",
    ])
    result = run_sweep(cfg)
    sweep = tmp_path / "out" / "sw"
    summary = json.loads((sweep / "sweep.json").read_text())
    pairs = summary["num_train_pairs"] + summary["num_test_pairs"]

    # Tokenization ran once: every pair of both splits went through PairTokenizer exactly once,
    # although two trials each trained on (and evaluated) the data.
    assert _tokenized_rows(counter) == pairs
    assert _tokenized_rows(ref_counter) == 0  # online: no reference stage
    # Control: the counter does see a tokenization (the driver's own, as in any run or sweep).
    (tmp_path / "control").mkdir()
    prepare_data(cfg, tmp_path / "control", verbose=False)
    assert _tokenized_rows(counter) == 2 * pairs

    # Nothing stays reserved: the stopped trial's Train placement group was freed too (Ray's own
    # cleaner cannot, without a State API), and the janitor frees a logged group still alive.
    assert all(pg["state"] == "REMOVED" for pg in placement_group_table().values())
    leaked = placement_group([{"CPU": 1}])
    import ray

    ray.get(leaked.ready())
    log = tmp_path / "leaked.txt"
    log.write_text(leaked.id.hex() + "\n")
    assert release_placement_groups(log) == 1 and release_placement_groups(log) == 0
    assert placement_group_table(leaked)["state"] == "REMOVED"

    by_lr = {row["train.lr"]: row for row in result.rows}
    trained, frozen = by_lr[0.0005], by_lr[0.0]
    assert trained["status"] == "finished" and trained["evals"] == 2 and trained["feasible"]
    assert frozen["status"] == "stopped early (ASHA)" and frozen["evals"] == 1
    assert not frozen["feasible"] and frozen["score"] == -math.inf and frozen["eval/helpful_acc"] == 0.0
    assert trained["objective"] > frozen["objective"] == 0.0  # the objective is configurable
    for row in result.rows:
        run_dir = Path(row["run_dir"])
        steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert any(s.get("kind") == "step" for s in steps), f"{run_dir.name} trained no step"
        assert json.loads((run_dir / "trial.json").read_text())["trial"] == run_dir.name
        assert (run_dir / PLACEMENT_GROUP_LOG).read_text().split(), "the run logged its placement group"
    assert (Path(trained["run_dir"]) / "final" / "config.json").exists()
    assert not (Path(frozen["run_dir"]) / "summary.json").exists()  # stopped mid-run

    # Worker metrics reached Tune with the guarded score, and the outputs exist.
    progress = sorted((sweep / "ray" / "tune").glob("*/result.json"))
    assert len(progress) == 2
    first = json.loads(progress[0].read_text().splitlines()[0])
    assert {SCORE_KEY, FEASIBLE_KEY, "eval/worst3", "eval/helpful_acc", "step"} <= set(first)
    for name in ("results.csv", "results.md", "heatmap.png", "best_config.yaml"):
        assert (sweep / name).exists(), name
    best = load_config(result.best_config)
    assert best.train.lr == 0.0005 and best.dual.epsilon == 0.05 and best.train.max_steps == 4
    assert sys.modules.get("catdpo_count_hook") is None  # the hook ran in Ray workers, not in this process

    # Sweep 2: the reference stage, once for all trials.
    common = [f"model.name_or_path={tiny_model_dir}", "data.max_train_rows=48", "data.max_test_rows=24",
              "tune.eta=[0.25, 1.0]", "tune.epsilon=[0.05]", "tune.max_concurrent=2", "tune.asha=false",
              "train.max_steps=2", "train.micro_batch_size=4", "model.reference=precompute",
              # both trials at once (one worker each on the 2-CPU cluster); no export: the point is what the
              # trials read (their final evaluation gives Tune its score)
              "output.save_final=false",
              f"model.reference_cache_dir={tmp_path / 'refcache'}", f"output.dir={tmp_path / 'out'}",
              "logging.tensorboard=false"]
    second = run_sweep(load_sweep_config(None, [*common, "tune.name=a"]))
    summary = json.loads((tmp_path / "out" / "a" / "sweep.json").read_text())
    pairs = summary["num_train_pairs"] + summary["num_test_pairs"]
    assert _tokenized_rows(ref_counter) == pairs  # every pair of both splits scored exactly once
    report = json.loads((tmp_path / "out" / "a" / "data_report.json").read_text())["reference"]
    assert report["mode"] == "precompute" and not report["pairs"]["hit"] and report["pairs"]["rows"] == pairs
    assert report["pairs"]["scored_in"] == "driver"  # a CPU sweep: no scoring actor to start
    # a later sweep or run over the same data reads the cache: its data preparation scores nothing
    (tmp_path / "again").mkdir()
    again = prepare_data(load_sweep_config(None, [*common, "tune.name=b"]), tmp_path / "again", verbose=False)
    assert _tokenized_rows(ref_counter) == pairs
    assert again.report["reference"]["pairs"]["hit"]
    assert len(second.rows) == 2 and all(row["status"] == "finished" for row in second.rows)
