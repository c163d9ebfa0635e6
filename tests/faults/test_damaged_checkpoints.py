"""Damaged, foreign and hostile checkpoints (local mode, checkpoint every step, three kept).

Each case damages this run's newest checkpoint on disk and reruns with the same name: the rerun
must notice before loading anything (the per-rank manifest: size + sha256 of every file, tied to
the run id), fall back to the newest good checkpoint, SAY so (``rejected_checkpoints`` in the
``resume`` row and a WARNING on the console) and still end identical to the uninterrupted run --
or refuse with a message that names the file. A planted pickle is never executed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from catdpo_ray.train.faults import InjectedFault
from catdpo_ray.train.integrity import manifest_name, write_manifest
from tests.faults.conftest import (
    LOCAL_KNOBS,
    MAX_STEPS,
    Console,
    Corpus,
    assert_same_run,
    checkpoint_steps,
    flip_byte,
    largest_file,
    local_checkpoints,
    make_cfg,
    rows_of,
    train,
)


class Planted:
    """A pickle payload: unpickling it (``torch.load(weights_only=False)``) creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def _killed_run(model: str, corpus: Corpus, out: Path, step: int, monkeypatch: pytest.MonkeyPatch) -> Any:
    cfg = make_cfg(model, corpus, out, "run", LOCAL_KNOBS)
    first = train(cfg, fault=f"step:{step}:0:{out / 'fired'}", monkeypatch=monkeypatch)
    assert isinstance(first.error, InjectedFault), first.summary.get("error")
    return cfg


def _last_resume(run_dir: Path) -> dict[str, Any]:
    return rows_of(run_dir, "resume")[-1]


def test_truncated_then_same_size_corrupted_newest_checkpoint_falls_back(
        tiny_model_dir: str, fault_corpus: Corpus, local_reference: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, memo_prepare: None, console: Console) -> None:
    cfg = _killed_run(tiny_model_dir, fault_corpus, tmp_path, 5, monkeypatch)  # dies after step 5, before its checkpoint
    ckpts = local_checkpoints(tmp_path, "run")
    assert checkpoint_steps(ckpts) == [2, 3, 4]

    # 1. truncation of the newest checkpoint's optimizer file (a disk-full or a cut copy)
    optim = largest_file(ckpts / "checkpoint_000004", "*optim_states.pt")
    size = optim.stat().st_size
    with optim.open("r+b") as fh:
        fh.truncate(size // 2)
    console.take()
    second = train(cfg)
    assert second.error is None, second.summary.get("error")
    resume = _last_resume(second.run_dir)
    assert resume["step"] == 3 and resume["checkpoint"] == "checkpoint_000003"
    (why,) = resume["rejected_checkpoints"]
    assert why.startswith("checkpoint_000004: failed verification on rank(s) [0] (")
    assert f"{optim}: size mismatch ({size // 2} bytes, manifest says {size}): truncated or replaced" in why
    said = console.take()
    assert f"WARNING: checkpoint skipped, {why}; resumed from an older one" in said
    assert_same_run(second.run_dir, local_reference, steps=MAX_STEPS)
    assert checkpoint_steps(ckpts) == [4, 5, 6]  # the bad step-4 checkpoint was rewritten by the rerun

    # 2. same-size corruption of the (now) newest checkpoint: one byte of the model file flipped.
    #    The finished run is rerun: it must fall back to step 5 and redo step 6 identically.
    model_file = largest_file(ckpts / "checkpoint_000006", "*model_states.pt")
    size = model_file.stat().st_size
    flip_byte(model_file)
    assert model_file.stat().st_size == size
    third = train(cfg)
    assert third.error is None, third.summary.get("error")
    resume = _last_resume(third.run_dir)
    assert resume["step"] == 5 and resume["checkpoint"] == "checkpoint_000005"
    (why,) = resume["rejected_checkpoints"]
    assert why.startswith(f"checkpoint_000006: failed verification on rank(s) [0] ({model_file}: hash mismatch (sha256 ")
    assert why.endswith("): the bytes changed after saving)")
    assert_same_run(third.run_dir, local_reference, steps=MAX_STEPS)


def test_foreign_checkpoint_and_planted_pickle_are_never_loaded(
        tiny_model_dir: str, fault_corpus: Corpus, local_reference: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, memo_prepare: None) -> None:
    cfg = _killed_run(tiny_model_dir, fault_corpus, tmp_path, 6, monkeypatch)  # dies after the last step
    ckpts = local_checkpoints(tmp_path, "run")
    assert checkpoint_steps(ckpts) == [3, 4, 5]
    run_id = json.loads((tmp_path / "run" / "run.json").read_text())["run_id"]
    marker = tmp_path / "pwned"

    # 1. a planted pickle in place of the newest checkpoint's model file (manifest left as it was)
    newest = ckpts / "checkpoint_000005"
    model_file = largest_file(newest, "*model_states.pt")
    torch.save({"module": Planted(marker)}, model_file)
    second = train(cfg)
    assert second.error is None, second.summary.get("error")
    assert not marker.exists(), "the planted pickle ran"
    resume = _last_resume(second.run_dir)
    assert resume["step"] == 4
    (why,) = resume["rejected_checkpoints"]
    assert why.startswith(f"checkpoint_000005: failed verification on rank(s) [0] ({model_file}: size mismatch")
    assert_same_run(second.run_dir, local_reference, steps=MAX_STEPS)

    # 2. the same pickle with a manifest forged to match it (whoever can write the storage path can
    #    rewrite the manifest too): verification passes, so only the weights_only load stands between
    #    the file and its code. The run must refuse, naming the file, and the code must not run.
    newest = ckpts / "checkpoint_000006"
    model_file = largest_file(newest, "*model_states.pt")
    torch.save({"module": Planted(marker)}, model_file)
    (newest / manifest_name(0)).unlink()
    write_manifest(newest, run_id=run_id, step=6, rank=0, world_size=1, extra={"tag": "ckpt"})
    third = train(cfg)
    assert not marker.exists(), "the planted pickle ran"
    assert third.error is not None and third.summary["status"] == "failed"
    assert third.summary["error"].startswith(
        f"UnsafeCheckpointError: {model_file}: refused to unpickle (weights_only=True): it needs io.open, which is "
        "not on the allow-list. Only checkpoints written by this run are loaded"), third.summary["error"]
    # the payload is live: DeepSpeed's own torch.load(weights_only=False) would have run it
    torch.load(model_file, weights_only=False)["module"].close()
    assert marker.exists()
    marker.unlink()

    # 3. another run's checkpoint (same step name, valid manifest of ITS run) copied over this run's newest
    foreign = local_checkpoints(local_reference.parent, "ref") / "checkpoint_000006"
    other_id = json.loads((local_reference / "run.json").read_text())["run_id"]
    shutil.rmtree(newest)
    shutil.copytree(foreign, newest)
    fourth = train(cfg)
    assert fourth.error is None, fourth.summary.get("error")
    resume = _last_resume(fourth.run_dir)
    assert resume["step"] == 5
    (why,) = resume["rejected_checkpoints"]
    assert why == (f"checkpoint_000006: failed verification on rank(s) [0] ({newest}: not this run's checkpoint "
                   f"(it belongs to run {other_id!r}, this run is {run_id!r}); refusing to load it)")
    assert_same_run(fourth.run_dir, local_reference, steps=MAX_STEPS)
