"""A worker death in Ray Train local mode (the worker is the driver's own process, so the injected
death ends the run), then the user's rerun with the same name: identical to an uninterrupted run.

* ``ckpt_write``: dies inside the checkpoint of step 4 after DeepSpeed wrote its files, before the
  manifest: the torn ``checkpoint_000004.partial`` is never trusted (removed on the rerun), the
  rerun resumes from the complete checkpoint of step 3.
* ``ckpt_done``: dies right after the checkpoint of step 4 was written and reported: the rerun
  resumes from it.
* ``ckpt_done`` of the last step: the run died after its final checkpoint, before exporting
  ``final/``: the rerun resumes at the last step, trains nothing, and must not log the final
  evaluation twice. (FAILS today: the resume keeps the rows of that step, then the rerun appends
  the final ``eval`` and ``checkpoint`` rows again -- see the report to the lead.)
* ``step`` 1 (before the first checkpoint): the rerun starts from step 0 with a fresh
  controller, and the files are cut back to nothing (one ``resume`` row at step 0).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from catdpo_ray.train.faults import InjectedFault
from tests.faults.conftest import (
    LOCAL_KNOBS,
    MAX_STEPS,
    Corpus,
    assert_same_run,
    checkpoint_steps,
    local_checkpoints,
    make_cfg,
    rows_of,
    train,
)


@pytest.mark.parametrize(("point", "step", "resumed_at", "on_disk"), [
    ("ckpt_write", 4, 3, [1, 2, 3]),
    ("ckpt_done", 4, 4, [1, 2, 3, 4]),  # it died before pruning the oldest
    ("step", 1, 0, []),
    ("ckpt_done", MAX_STEPS, MAX_STEPS, [3, 4, 5, 6]),  # after the final checkpoint, before the export
], ids=["ckpt_write", "ckpt_done", "before_first_checkpoint", "after_final_checkpoint"])
def test_local_kill_then_rerun_equals_uninterrupted(point: str, step: int, resumed_at: int, on_disk: list[int],
                                                    tiny_model_dir: str, fault_corpus: Corpus, local_reference: Path,
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    memo_prepare: None) -> None:
    cfg = make_cfg(tiny_model_dir, fault_corpus, tmp_path, "run", LOCAL_KNOBS)
    marker = tmp_path / "fired"
    first = train(cfg, fault=f"{point}:{step}:0:{marker}", monkeypatch=monkeypatch)
    assert marker.read_text() == f"{point}:{step}:0\n"
    assert isinstance(first.error, InjectedFault) and first.summary["status"] == "failed"
    assert f"injected fault at {point} of step {step} on rank 0" in first.summary["error"]
    ckpts = local_checkpoints(tmp_path, "run")
    assert checkpoint_steps(ckpts) == on_disk
    if point == "ckpt_write":  # the torn checkpoint sits beside the good ones, never renamed into place
        assert (ckpts / "checkpoint_000004.partial").is_dir()
    assert [r["step"] for r in rows_of(first.run_dir, "step")] == list(range(1, step + 1))
    assert not (first.run_dir / "final").exists()

    second = train(cfg)  # the user's rerun: same output.dir + output.name
    assert second.error is None, second.summary.get("error")
    (resume,) = rows_of(second.run_dir, "resume")[-1:]
    assert resume["step"] == resumed_at and resume["from_checkpoint"] == (resumed_at > 0)
    assert "rejected_checkpoints" not in resume  # the torn one was never a candidate
    if resumed_at:
        assert resume["checkpoint"] == f"checkpoint_{resumed_at:06d}"
        assert resume["engine_global_steps"] == resumed_at and resume["optimizer_steps"] == resumed_at
    assert not list(ckpts.glob("*.partial")) and not list(ckpts.glob("*.old"))
    assert_same_run(second.run_dir, local_reference, steps=MAX_STEPS)
