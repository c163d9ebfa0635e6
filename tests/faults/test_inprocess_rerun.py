"""A rerun in the same Python process after a failed run (a notebook, a script that retries).

The failed run's ``RunResult.error`` holds its traceback, which keeps the trainer and the named
MarginController actor (``catdpo-controller-<run_id>``) alive; the rerun of the same run then
tries to create an actor with the same name. It must train (and resume), not fail with
``ActorAlreadyExistsError``. The other fault tests release the actor themselves
(``conftest.release_controller``); this one checks the trainer's own behaviour.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from catdpo_ray.train.driver import run_training
from catdpo_ray.train.faults import InjectedFault
from tests.faults.conftest import LOCAL_KNOBS, Corpus, make_cfg, release_controller, rows_of


def test_inprocess_rerun_after_a_failure(tiny_model_dir: str, fault_corpus: Corpus, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, memo_prepare: None) -> None:
    cfg = make_cfg(tiny_model_dir, fault_corpus, tmp_path, "run", LOCAL_KNOBS, "train.max_steps=2",
                   "output.save_final=false")
    with monkeypatch.context() as m:
        m.setenv("CATDPO_FAULT", f"ckpt_done:1:0:{tmp_path / 'fired'}")
        first = run_training(cfg)
    assert isinstance(first.error, InjectedFault)
    try:
        second = run_training(cfg)  # `first` (and its traceback) is still referenced, as in a notebook
        assert second.error is None, second.summary.get("error")
        assert [r["step"] for r in rows_of(second.run_dir, "step")] == [1, 2]
        assert rows_of(second.run_dir, "resume")[-1]["step"] == 1
    finally:
        release_controller(tmp_path / "run")
