"""Two Ray-managed workers (gloo), where collectives, Ray's restarts and Ray's checkpoint
registration matter. ``output.max_failures=1``: Ray restarts the worker group after the injected
death (``os._exit(1)`` in the worker process, the way an OOM kill or a lost node looks to Ray Train)
and the run must end exactly as the uninterrupted one did, with exit status ``finished``.

* rank 1 dies after step 1, before the first checkpoint: the restart has no checkpoint, so the
  controller and the sink files are reset to step 0 (not: λ and rows of the lost step kept).

Kills during and after a checkpoint write run in local mode here (``test_kill_local.py``); at 2
workers, every kill point x step x rank (rank 0 inside the checkpoint of step 4 among them: the torn
checkpoint is never trusted, the group restarts from step 2) is the exhaustive benchmark
``benchmarks/faults_exhaustive.py --mode ray2`` (results in ``benchmarks/results/``), kept out of the
suite's 10-minute budget.

The shared 2-worker reference run also carries the held-out evaluation check (every test pair
scored exactly once, with an odd test split) and the refusal of a switch to local mode.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from catdpo_ray.config import PKU_CATEGORIES, DataConfig
from catdpo_ray.data.loader import load_split
from catdpo_ray.train.resume import ResumeRefused
from tests.faults.conftest import RAY2_KNOBS, Console, Corpus, assert_same_run, make_cfg, rows_of, train
from tests.faults.test_resume_changes import snapshot

pytestmark = pytest.mark.slow
RAY2_STEPS = 5


def test_heldout_eval_scores_every_test_pair_once(ray2_reference: Path, fault_corpus: Corpus) -> None:
    pairs, _ = load_split(DataConfig(train=fault_corpus.train, test=fault_corpus.test), "test", pair_mode="safety_aware")
    assert len(pairs) % 2 == 1, "the point is an odd test split over 2 workers"
    categories = list(PKU_CATEGORIES)  # the configured order (default)
    expected = {c: sum(p["categories"][i] for p in pairs if p["safety_gap"] == 1) for i, c in enumerate(categories)}
    evals = rows_of(ray2_reference, "eval")
    assert [r["step"] for r in evals] == [3, RAY2_STEPS]
    for row in evals:
        assert {c: v["n"] for c, v in row["per_category"].items()} == expected
    # single-pair categories are the ones an equal split across ranks could lose entirely
    assert sum(expected.values()) >= 20 and sum(v == 1 for v in expected.values()) >= 3


@pytest.mark.parametrize(("fault", "resumes", "said"), [
    # the restart without a checkpoint cuts metrics.jsonl back to nothing (its own resume row included)
    ("step:1:1", [0], "restarted from step 0 (no checkpoint was restored): metrics.jsonl and lambdas.csv reset ("),
], ids=["rank1_before_first_checkpoint"])
def test_worker_killed_ray_restarts_and_run_equals_uninterrupted(
        fault: str, resumes: list[int], said: str, tiny_model_dir: str, fault_corpus: Corpus, ray2_reference: Path,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, memo_prepare: None, console: Console) -> None:
    marker = tmp_path / "fired"
    result = train(make_cfg(tiny_model_dir, fault_corpus, tmp_path, "run", RAY2_KNOBS), fault=f"{fault}:{marker}",
                   monkeypatch=monkeypatch)
    assert marker.exists(), "the fault never fired"
    assert said in console.take()  # the restart was noticed and said
    assert result.error is None, result.summary.get("error")
    run = result.run_dir
    resume_rows = rows_of(run, "resume")
    assert [r["step"] for r in resume_rows] == resumes
    assert all("rejected_checkpoints" not in r for r in resume_rows)
    if resumes[-1]:
        assert resume_rows[-1]["checkpoint"] == f"checkpoint_{resumes[-1]:06d}"
        assert resume_rows[-1]["optimizer_steps"] == resumes[-1]
    assert_same_run(run, ray2_reference, steps=RAY2_STEPS)
    run_id = json.loads((run / "run.json").read_text())["run_id"]
    assert not list(Path(tempfile.gettempdir()).glob(f"catdpo-ckpt-{run_id}-*")), "staging folders left behind"


def test_switch_to_local_mode_is_refused(tiny_model_dir: str, fault_corpus: Corpus, ray2_reference: Path) -> None:
    out = ray2_reference.parent
    before = snapshot(out)
    with pytest.raises(ResumeRefused) as err:
        train(make_cfg(tiny_model_dir, fault_corpus, out, "ref", RAY2_KNOBS, "scaling.num_workers=0"))
    assert str(err.value).startswith("cannot resume run 'ref' from its checkpoint: 1 setting(s) differ from the ones it "
                                     "was trained with and would make the resumed run differ from an uninterrupted "
                                     "one:\n  scaling.num_workers: 2 -> 0\n")
    assert snapshot(out) == before
