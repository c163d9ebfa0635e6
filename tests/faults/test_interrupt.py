"""Ctrl-C on the driver (issue 11, items 1 and 10): ``catdpo-ray train`` in a subprocess gets SIGINT
after two step rows. It must exit with 130, print a clean message and the exact resume command (no
traceback), and write ``summary.json`` with status ``interrupted`` and ``resume_command``. Running
that command then ends identical to an uninterrupted run.

The interrupted run is a real CLI process (its own Ray, its own tokenization); the resume runs in
this process from the printed command's own arguments.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from catdpo_ray.config import load_config
from tests.faults.conftest import LOCAL_KNOBS, MAX_STEPS, Corpus, assert_same_run, overrides, rows_of, train


@dataclass
class Interrupted:
    run_dir: Path
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def interrupted(tiny_model_dir: str, fault_corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> Interrupted:
    """``catdpo-ray train`` (local mode) in a subprocess, SIGINT once metrics.jsonl shows 2 step rows."""
    out = tmp_path_factory.mktemp("sigint")
    run_dir = out / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CATDPO_FAULT")}
    proc = subprocess.Popen([sys.executable, "-m", "catdpo_ray.cli", "train",
                             *overrides(tiny_model_dir, fault_corpus, out, "run", LOCAL_KNOBS)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 400
        steps = 0
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                steps = sum('"kind": "step"' in x for x in (run_dir / "metrics.jsonl").read_text().splitlines())
            except OSError:
                steps = 0
            if steps >= 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None and steps >= 2, f"no 2 step rows while running (rc {proc.poll()})"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return Interrupted(run_dir, proc.returncode, stdout, stderr)


def test_sigint_then_resume_command_equals_uninterrupted(interrupted: Interrupted, local_reference: Path,
                                                         memo_prepare: None) -> None:
    run_dir = interrupted.run_dir
    err = interrupted.stderr
    assert interrupted.returncode == 130, (interrupted.returncode, err[-3000:])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["error"] == "interrupted by the user (Ctrl-C)"
    command = summary["resume_command"]
    assert command == (f"catdpo-ray train --config {run_dir / 'config.yaml'} output.name=run "
                       f"output.dir={run_dir.parent}")
    assert "[train] interrupted (Ctrl-C): stopping the workers ..." in err
    assert f"checkpoints are kept. Resume with:\n  {command}" in err
    stopped = [r["step"] for r in rows_of(run_dir, "step")]
    assert stopped == list(range(1, len(stopped) + 1)) and 2 <= len(stopped) < MAX_STEPS
    assert not (run_dir / "final").exists()

    # the printed command, as the user would run it (its own arguments, in this process)
    args = shlex.split(command)
    assert args[:4] == ["catdpo-ray", "train", "--config", str(run_dir / "config.yaml")]
    resumed = train(load_config(args[3], args[4:]))
    assert resumed.error is None, resumed.summary.get("error")
    assert rows_of(run_dir, "resume")[-1]["step"] >= 1  # from a checkpoint (one is written every step)
    assert_same_run(run_dir, local_reference, steps=MAX_STEPS)


def test_sigint_prints_no_traceback(interrupted: Interrupted) -> None:
    """Issue 11 item 10: a clean message, not a raw traceback (also none after the message, while
    the interpreter shuts down with the local-mode worker still inside a Ray Data iterator)."""
    assert "Traceback" not in interrupted.stderr, interrupted.stderr[-3000:]
