"""Shared pieces of the fault-injection suite (issue 11 acceptance).

Every case trains a short run on a small corpus cut from the bundled data, breaks it at one point
(a worker killed, the driver interrupted, checkpoint files damaged, sink lines torn, a changed
config), reruns it with the same ``output.dir`` + ``output.name`` (the user's rerun) and compares the
outcome EXACTLY with one uninterrupted run of the same configuration (:func:`assert_same_run`), or
checks the refusal message. The uninterrupted reference runs are computed once per session
(session-scoped fixtures) and shared by every case of that configuration.

Two configurations:

* ``local``: Ray Train local mode (``scaling.num_workers=0``, in-process; the worker death is an
  :class:`~catdpo_ray.train.faults.InjectedFault` and the rerun is the user's rerun). Checkpoint
  every step, three kept, so a damaged newest checkpoint has older ones to fall back to.
* ``ray2``: two Ray-managed workers over gloo (``output.max_failures=1``: Ray restarts the killed
  worker group itself, the run must end as if nothing happened).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from catdpo_ray.config import RunConfig, load_config
from tests.train.helpers import read_lambdas_csv, small_corpus

#: Wall-clock fields of a step row: the only ones allowed to differ between two runs.
WALL_CLOCK = frozenset({"pairs_per_s", "tokens_per_s", "step_time_s", "cuda_max_allocated_gib"})

#: Corpus sizes: 72 train rows give enough pairs for 6 steps of 4 pairs (local) / 8 pairs (2 workers);
#: 25 test rows give an odd number of safety-aware test pairs (checked in the eval-count test).
N_TRAIN, N_TEST = 72, 25
MAX_STEPS = 6

LOCAL_KNOBS = ("scaling.num_workers=0", "train.micro_batch_size=4", f"train.max_steps={MAX_STEPS}",
               "train.checkpoint_every=1", "output.num_checkpoints_to_keep=3", "train.eval_every=3",
               "logging.tensorboard=false", "train.zero_stage=2")
RAY2_KNOBS = ("scaling.num_workers=2", "train.micro_batch_size=4", "train.max_steps=5", "train.checkpoint_every=2",
              "output.num_checkpoints_to_keep=3", "train.eval_every=3", "logging.tensorboard=false",
              "train.zero_stage=2", "output.max_failures=1")


@dataclass(frozen=True)
class Corpus:
    train: str
    test: str


@pytest.fixture(scope="session")
def fault_corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    train, test = small_corpus(tmp_path_factory.mktemp("fault_corpus"), N_TRAIN, N_TEST)
    return Corpus(train, test)


def overrides(model: str, corpus: Corpus, out: Path, name: str, knobs: Iterable[str], *extra: str) -> list[str]:
    return [f"model.name_or_path={model}", f"data.train={corpus.train}", f"data.test={corpus.test}",
            f"output.dir={out}", f"output.name={name}", *knobs, *extra]


def make_cfg(model: str, corpus: Corpus, out: Path, name: str, knobs: Iterable[str], *extra: str) -> RunConfig:
    return load_config(None, overrides(model, corpus, out, name, knobs, *extra))


#: ``prepare_data`` results by the config keys that decide them (see :func:`memo_prepare`).
_PREPARED: dict[str, Any] = {}


def _data_key(cfg: RunConfig) -> str:
    d = cfg.to_dict()
    return json.dumps({"data": d["data"], "model": d["model"], "loss": d["loss"], "seed": d["train"]["seed"],
                       "shuffle": d["train"]["shuffle"], "mb": d["train"]["micro_batch_size"],
                       "workers": d["scaling"]["num_workers"], "eval": [d["train"]["eval_every"],
                                                                       d["train"]["eval_before_after"]]},
                      sort_keys=True)


def install_memo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokenize + reference-score each data configuration once per session.

    ``driver.prepare_data`` is deterministic in the keys of :func:`_data_key` (the run directory
    only receives the quarantine file, which ``load_pairs`` already wrote before it is called), and
    it costs a Ray Data tokenization pass plus the reference stage: 20-50 s a call on the shared
    2-core machine, more than the short runs themselves. The first run of each configuration (the
    reference run) goes through the real function; every later ``run_training`` of the same
    configuration reuses its materialised datasets, as sweeps do. Everything else in
    ``run_training`` (resume checks, config.yaml, resumes.jsonl, sinks, restore) runs for real.
    """
    from catdpo_ray.train import driver

    real = driver.prepare_data

    def cached(cfg: RunConfig, run_dir: Path, *, verbose: bool = True, loaded: Any = None) -> Any:
        key = _data_key(cfg)
        if key not in _PREPARED:
            _PREPARED[key] = real(cfg, run_dir, verbose=verbose, loaded=loaded)
        return _PREPARED[key]

    monkeypatch.setattr(driver, "prepare_data", cached)


@pytest.fixture
def memo_prepare(monkeypatch: pytest.MonkeyPatch) -> None:
    """:func:`install_memo` for one test."""
    install_memo(monkeypatch)


class Console:
    """What the metric sinks print (progress, resume notes, warnings), also passed on to stdout."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        import sys

        self.parts.append(text)
        return sys.stdout.write(text)

    def flush(self) -> None:
        pass

    def take(self) -> str:
        text, self.parts = "".join(self.parts), []
        return text


@pytest.fixture
def console(monkeypatch: pytest.MonkeyPatch) -> Console:
    """The sinks' console output (``MetricSinks(out=...)`` binds ``sys.stdout`` at import time, so
    pytest's capsys/capfd do not see it)."""
    from functools import partial

    from catdpo_ray.train import sinks

    collected = Console()
    monkeypatch.setattr(sinks, "MetricSinks", partial(sinks.MetricSinks, out=collected))
    return collected


def train(cfg: RunConfig, *, fault: str | None = None, monkeypatch: pytest.MonkeyPatch | None = None) -> Any:
    """``run_training(cfg)``, with ``$CATDPO_FAULT`` set to ``fault`` for this call only."""
    from catdpo_ray.train.driver import run_training

    try:
        if fault is None:
            return run_training(cfg)
        assert monkeypatch is not None
        with monkeypatch.context() as m:
            m.setenv("CATDPO_FAULT", fault)
            return run_training(cfg)
    finally:
        release_controller(Path(cfg.output.dir).resolve() / str(cfg.output.name))


def release_controller(run_dir: Path, timeout_s: float = 30.0) -> bool:
    """Kill this run's MarginController actor if it outlived ``run_training`` (returns whether one did).

    ``fit_run`` kills it itself now; this is a safety net so that one failing case (e.g. a run that
    raised before ``fit_run`` cleaned up) cannot block the next case's actor name.
    ``test_inprocess_rerun.py`` checks the trainer's own behaviour without this helper.
    """
    import time

    import ray

    from catdpo_ray.train.driver import controller_name

    if not ray.is_initialized() or not (run_dir / "run.json").exists():
        return False
    name = controller_name(json.loads((run_dir / "run.json").read_text())["run_id"])
    try:
        handle = ray.get_actor(name)
    except ValueError:
        return False
    ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name)
        except ValueError:
            return True
        time.sleep(0.2)
    raise TimeoutError(f"the actor {name} did not go away within {timeout_s} s")


# ---- the uninterrupted reference runs: one per configuration, once per session ----

@pytest.fixture(scope="session")
def local_reference(tiny_model_dir: str, fault_corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref_local")
    with pytest.MonkeyPatch.context() as mp:
        install_memo(mp)
        result = train(make_cfg(tiny_model_dir, fault_corpus, out, "ref", LOCAL_KNOBS))
    assert result.error is None, result.summary.get("error")
    return result.run_dir


@pytest.fixture(scope="session")
def ray2_reference(tiny_model_dir: str, fault_corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref_ray2")
    with pytest.MonkeyPatch.context() as mp:
        install_memo(mp)
        result = train(make_cfg(tiny_model_dir, fault_corpus, out, "ref", RAY2_KNOBS))
    assert result.error is None, result.summary.get("error")
    return result.run_dir


# ---- reading and comparing run directories ----

def metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def rows_of(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    return [r for r in metrics_rows(run_dir) if r.get("kind") == kind]


def comparable_steps(run_dir: Path) -> list[dict[str, Any]]:
    """Step rows without their wall-clock fields (everything else, lr included, must match exactly)."""
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in rows_of(run_dir, "step")]


def final_tensors(run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    files = sorted((run_dir / "final").glob("*.safetensors"))
    assert files, f"{run_dir / 'final'} holds no safetensors file"
    tensors: dict[str, Any] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def assert_same_run(run: Path, reference: Path, *, steps: int | None = None) -> None:
    """``run`` equals the uninterrupted ``reference`` exactly: final/ tensors, lambdas.csv, step rows
    (minus wall-clock fields) and eval rows. ``steps``: the expected step numbers 1..steps."""
    import torch

    got_steps, want_steps = comparable_steps(run), comparable_steps(reference)
    numbers = [r["step"] for r in got_steps]
    assert numbers == [r["step"] for r in want_steps], f"step rows {numbers} (no step twice, none missing)"
    if steps is not None:
        assert numbers == list(range(1, steps + 1))
    for got, want in zip(got_steps, want_steps):
        assert got == want, f"step {got['step']} differs: " + ", ".join(
            f"{k}: {got.get(k)!r} != {want.get(k)!r}" for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k))
    assert rows_of(run, "eval") == rows_of(reference, "eval")
    assert read_lambdas_csv(run) == read_lambdas_csv(reference)
    assert (run / "lambdas.csv").read_text() == (reference / "lambdas.csv").read_text()
    a, b = final_tensors(run), final_tensors(reference)
    assert sorted(a) == sorted(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"final/ tensors differ: {different[:5]} ..."
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished", summary


def local_checkpoints(out: Path, name: str) -> Path:
    return out / "ray_storage" / name / "local_checkpoints"


def checkpoint_steps(root: Path) -> list[int]:
    return sorted(int(d.name.removeprefix("checkpoint_")) for d in root.glob("checkpoint_*")
                  if d.is_dir() and d.name.removeprefix("checkpoint_").isdigit())


def largest_file(ckpt: Path, pattern: str) -> Path:
    files = sorted((ckpt / "ckpt").glob(pattern), key=lambda p: p.stat().st_size, reverse=True)
    assert files, f"no {pattern} under {ckpt / 'ckpt'}"
    return files[0]


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Change one byte in place (same size): the tensor payload, past the zip headers."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def copy_tree(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)


Check = Callable[[Path], None]
