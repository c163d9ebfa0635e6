"""A write cut off mid-line (disk full, a kill during the append) in ``metrics.jsonl`` and
``lambdas.csv``: the rerun drops the torn line, says so, and ends identical to an uninterrupted run
(it used to crash in ``_truncate_jsonl`` on a ``JSONDecodeError``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from catdpo_ray.train.faults import InjectedFault
from tests.faults.conftest import LOCAL_KNOBS, MAX_STEPS, Console, Corpus, assert_same_run, make_cfg, rows_of, train


def _tear_last_line(path: Path) -> str:
    """Cut the file in the middle of its last line (no newline left); returns the torn text."""
    text = path.read_text()
    body, last = text.rstrip("\n").rsplit("\n", 1)
    torn = last[: len(last) // 2]
    path.write_text(body + "\n" + torn)
    return torn


def test_torn_last_lines_of_both_sinks_then_rerun_equals_uninterrupted(
        tiny_model_dir: str, fault_corpus: Corpus, local_reference: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, memo_prepare: None, console: Console) -> None:
    cfg = make_cfg(tiny_model_dir, fault_corpus, tmp_path, "run", LOCAL_KNOBS)
    first = train(cfg, fault=f"step:3:0:{tmp_path / 'fired'}", monkeypatch=monkeypatch)
    assert isinstance(first.error, InjectedFault)
    run = first.run_dir
    assert [r["step"] for r in rows_of(run, "step")] == [1, 2, 3]
    torn_metrics = _tear_last_line(run / "metrics.jsonl")
    torn_csv = _tear_last_line(run / "lambdas.csv")
    assert torn_csv.startswith("3,") and torn_metrics.startswith("{")
    console.take()

    second = train(cfg)
    assert second.error is None, second.summary.get("error")
    said = console.take()
    assert "metrics.jsonl: dropped 1 torn line (a write was cut off, e.g. disk full or a kill)" in said
    assert "lambdas.csv: dropped 1 torn line (a write was cut off, e.g. disk full or a kill)" in said
    assert torn_metrics not in (run / "metrics.jsonl").read_text().splitlines()
    assert rows_of(run, "resume")[-1]["step"] == 2  # the checkpoint of step 2 (step 3's was never written)
    assert_same_run(run, local_reference, steps=MAX_STEPS)
