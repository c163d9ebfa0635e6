"""The MarginController actor killed mid-run (issue 11, item 7).

Local mode is enough: the controller is a real Ray actor (``max_restarts=-1``) even when the worker
runs in-process. A thread kills it (``ray.kill(no_restart=False)``: Ray re-creates it empty) once
``metrics.jsonl`` shows two step rows; rank 0 notices on its next call, re-seeds it from its mirror
of the last state and replays the undrained rows. The run must finish, say so, and end identical to
an uninterrupted run (no row lost or doubled, the same λ).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from tests.faults.conftest import LOCAL_KNOBS, MAX_STEPS, Corpus, assert_same_run, make_cfg, rows_of, train


def test_killing_the_controller_mid_run_changes_nothing(tiny_model_dir: str, fault_corpus: Corpus, local_reference: Path,
                                                        tmp_path: Path, memo_prepare: None) -> None:
    import ray

    from catdpo_ray.train.driver import controller_name

    run_dir = tmp_path / "run"
    killed: dict[str, int] = {}
    stop = threading.Event()

    def killer() -> None:
        metrics = run_dir / "metrics.jsonl"
        while not stop.is_set():
            try:
                steps = sum('"kind": "step"' in line for line in metrics.read_text().splitlines())
                run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
            except (OSError, ValueError):
                steps = 0
            if steps >= 2:
                ray.kill(ray.get_actor(controller_name(run_id)), no_restart=False)
                killed["after_step_rows"] = steps
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        result = train(make_cfg(tiny_model_dir, fault_corpus, tmp_path, "run", LOCAL_KNOBS))
    finally:
        stop.set()
        thread.join(timeout=10)
    assert killed, "the controller was never killed"
    assert result.error is None, result.summary.get("error")
    (restored,) = rows_of(run_dir, "controller_restored")
    assert restored["restorations"] == 1 and killed["after_step_rows"] <= restored["step"] < MAX_STEPS
    assert [r["step"] for r in rows_of(run_dir, "resume")] == [0]  # the first start only: no reset, no cut-back
    assert_same_run(run_dir, local_reference, steps=MAX_STEPS)
