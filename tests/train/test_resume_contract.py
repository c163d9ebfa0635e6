"""The resume contract: which config changes a resume honours, the refusal message, the record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from catdpo_ray.config import load_config
from catdpo_ray.train.resume import (
    Change,
    ResumeRefused,
    check_resume,
    diff_for_resume,
    record_resume,
    write_original_config,
)


def _cfg(*overrides: str) -> dict:
    return load_config(None, ["data.categories=[a, b, c]", *overrides]).to_dict()


def test_identical_configs_resume_with_no_changes() -> None:
    assert check_resume(_cfg(), _cfg()) == []


def test_cadence_logging_and_failure_keys_may_change() -> None:
    new = _cfg("train.log_every=5", "train.checkpoint_every=3", "train.eval_every=2", "train.stop_after_step=4",
               "output.max_failures=3", "output.num_checkpoints_to_keep=5", "logging.tensorboard=false",
               "eval.max_new_tokens=7", "tune.num_samples=4", "scaling.ray_address=auto")
    changes = check_resume(_cfg(), new)
    assert [(c.key, c.old, c.new) for c in changes] == [
        ("eval.max_new_tokens", 48, 7), ("logging.tensorboard", True, False), ("output.max_failures", 0, 3),
        ("output.num_checkpoints_to_keep", 2, 5), ("scaling.ray_address", None, "auto"),
        ("train.checkpoint_every", 0, 3), ("train.eval_every", 0, 2), ("train.log_every", 1, 5),
        ("train.stop_after_step", None, 4), ("tune.num_samples", 1, 4)]
    assert all(c.allowed for c in changes)


def test_refusal_names_every_key_old_new_and_what_to_do() -> None:
    with pytest.raises(ResumeRefused) as err:
        check_resume(_cfg(), _cfg("train.lr=0.001", "scaling.num_workers=0", "train.log_every=3"),
                     run_name="catdpo-x", step=4)
    msg = str(err.value)
    assert msg.startswith("cannot resume run 'catdpo-x' from its checkpoint at step 4: 2 setting(s) differ from the "
                          "ones it was trained with and would make the resumed run differ from an uninterrupted one:\n"
                          "  scaling.num_workers: 2 -> 0\n  train.lr: 0.0005 -> 0.001\n")
    assert "set another output.name" in msg and "train.log_every" not in msg.split("Keys that may change")[0]


def test_reordered_categories_are_refused_by_name() -> None:
    (change,) = diff_for_resume(_cfg(), _cfg("data.categories=[c, a, b]"))
    assert not change.allowed
    assert change.describe() == ('data.categories: ["a", "b", "c"] -> ["c", "a", "b"] (same names in another order: '
                                 "λ, the violation statistics and the category columns follow the saved order; "
                                 "restore it)")


def test_max_steps_only_with_a_schedule_that_ignores_the_horizon() -> None:
    (cosine,) = diff_for_resume(_cfg("train.max_steps=10"), _cfg("train.max_steps=20"))
    assert not cosine.allowed and "horizon of the warmup/cosine LR schedule" in cosine.why
    flat = ("train.lr_schedule=constant", "train.warmup_ratio=0")
    (const,) = diff_for_resume(_cfg(*flat, "train.epochs=1"), _cfg(*flat, "train.epochs=3"))
    assert const.allowed and (const.old, const.new) == (1, 3)
    # constant schedule but with warmup: the warmup length is a fraction of the planned steps
    (warm,) = diff_for_resume(_cfg("train.lr_schedule=constant", "train.max_steps=10"),
                              _cfg("train.lr_schedule=constant", "train.max_steps=20"))
    assert not warm.allowed


def test_nested_and_missing_keys_are_reported_at_the_deepest_key() -> None:
    saved, new = _cfg(), _cfg("model.lora.r=4")
    del saved["train"]["shuffle_buffer"]  # a config from an older version without this key
    assert [c.describe() for c in diff_for_resume(saved, new)] == [
        "model.lora.r: 16 -> 4", "train.shuffle_buffer: (absent) -> 1024"]


def test_record_resume_appends_and_never_touches_config_yaml(tmp_path: Path) -> None:
    assert write_original_config(tmp_path, "train:\n  lr: 0.0005\n") is True
    assert write_original_config(tmp_path, "train:\n  lr: 0.1\n") is False
    assert (tmp_path / "config.yaml").read_text() == "train:\n  lr: 0.0005\n"
    first = record_resume(tmp_path, [Change("train.log_every", 1, 5, True), Change("train.lr", 1, 2, False)], step=4)
    with (tmp_path / "resumes.jsonl").open("a") as fh:
        fh.write('{"resume": 2, "st')  # a crash mid-append
    second = record_resume(tmp_path, [], step=8)
    rows = [json.loads(line) for line in (tmp_path / "resumes.jsonl").read_text().splitlines()]
    assert (first, second) == (1, 2)
    assert [(r["resume"], r["step"], r["overrides"]) for r in rows] == [
        (1, 4, {"train.log_every": {"old": 1, "new": 5}}), (2, 8, {})]
