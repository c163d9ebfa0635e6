"""Resuming with a changed config, one case per class of key (issue 11, item 3).

Refused (checked in the driver before Ray starts, so nothing is trained and nothing is written):
``train.lr``, ``data.categories`` in another order, ``loss.beta``, ``scaling.num_workers`` (local ->
Ray-managed here; Ray-managed -> local in ``test_kill_ray2.py``) and ``train.max_steps`` under the
cosine schedule. Accepted: ``train.log_every`` and ``logging.progress`` (recorded in
``resumes.jsonl``, ``config.yaml`` byte-identical) -- and the resumed run equals the uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from catdpo_ray.config import PKU_CATEGORIES
from catdpo_ray.train.faults import InjectedFault
from catdpo_ray.train.resume import ResumeRefused
from tests.faults.conftest import LOCAL_KNOBS, MAX_STEPS, Corpus, assert_same_run, make_cfg, rows_of, train

REORDERED = [PKU_CATEGORIES[1], PKU_CATEGORIES[0], *PKU_CATEGORIES[2:]]


def snapshot(out: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under ``out``: a refused resume changes none of them."""
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("change", "line"), [
    ("train.lr=0.001", "  train.lr: 0.0005 -> 0.001\n"),
    ("loss.beta=0.2", "  loss.beta: 0.1 -> 0.2\n"),
    ("scaling.num_workers=2", "  scaling.num_workers: 0 -> 2\n"),
    ("train.max_steps=8", "  train.max_steps: 6 -> 8 (changes the planned steps, the horizon of the warmup/cosine LR "
                          "schedule the steps so far followed; allowed only with train.lr_schedule=constant and "
                          "train.warmup_ratio=0)\n"),
    ("data.categories=[" + ", ".join(REORDERED) + "]",
     f"  data.categories: {json.dumps(PKU_CATEGORIES)} -> {json.dumps(REORDERED)} (same names in another order: λ, the "
     "violation statistics and the category columns follow the saved order; restore it)\n"),
], ids=["lr", "beta", "num_workers", "max_steps", "categories"])
def test_non_resumable_change_is_refused_before_anything_runs(change: str, line: str, tiny_model_dir: str,
                                                               fault_corpus: Corpus, local_reference: Path) -> None:
    """Against the finished reference run (read-only: a refusal must touch nothing)."""
    out = local_reference.parent
    before = snapshot(out)
    config_yaml = (local_reference / "config.yaml").read_bytes()
    with pytest.raises(ResumeRefused) as err:
        train(make_cfg(tiny_model_dir, fault_corpus, out, "ref", LOCAL_KNOBS, change))
    msg = str(err.value)
    assert msg.startswith("cannot resume run 'ref' from its checkpoint: 1 setting(s) differ from the ones it was "
                          "trained with and would make the resumed run differ from an uninterrupted one:\n" + line), msg
    assert "To resume, restore the old values. To train with the new ones, start a new run" in msg
    assert (local_reference / "config.yaml").read_bytes() == config_yaml
    assert snapshot(out) == before


def test_resumable_changes_are_recorded_and_the_run_equals_uninterrupted(
        tiny_model_dir: str, fault_corpus: Corpus, local_reference: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, memo_prepare: None) -> None:
    cfg = make_cfg(tiny_model_dir, fault_corpus, tmp_path, "run", LOCAL_KNOBS)
    first = train(cfg, fault=f"ckpt_done:4:0:{tmp_path / 'fired'}", monkeypatch=monkeypatch)
    assert isinstance(first.error, InjectedFault)
    run = first.run_dir
    config_yaml = (run / "config.yaml").read_bytes()
    assert not (run / "resumes.jsonl").exists()

    second = train(make_cfg(tiny_model_dir, fault_corpus, tmp_path, "run", LOCAL_KNOBS, "train.log_every=2",
                            "logging.progress=false"))
    assert second.error is None, second.summary.get("error")
    assert (run / "config.yaml").read_bytes() == config_yaml
    (entry,) = [json.loads(x) for x in (run / "resumes.jsonl").read_text().splitlines()]
    assert entry["resume"] == 1 and entry["step"] == 4
    assert entry["overrides"] == {"logging.progress": {"old": True, "new": False},
                                  "train.log_every": {"old": 1, "new": 2}}
    assert rows_of(run, "resume")[-1]["step"] == 4
    assert_same_run(run, local_reference, steps=MAX_STEPS)
