"""Driver-side sinks: metrics.jsonl, lambdas.csv, resume truncation, torn lines, reset, progress/ETA,
TensorBoard, MLflow (real, file store)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from catdpo_ray.config import load_config
from catdpo_ray.train.sinks import MetricSinks, atomic_write_bytes, atomic_write_text, format_duration
from tests.train.helpers import read_lambdas_csv


def _step(step: int, lam: float) -> dict:
    return {"kind": "step", "step": step, "loss": 0.5, "dpo_loss": 0.4, "reward_acc": 0.75, "pairs_per_s": 10.0,
            "tokens_per_s": 100.0, "lr": 1e-4, "lambdas": [lam, 0.0], "violation_rate": {"a": 0.5, "b": None},
            "n": [2.0, 0.0], "v": [1.0, 0.0]}


def test_files_resume_truncation_tensorboard_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file stores behind this opt-in
    # a file store: the test extra installs mlflow-skinny, which has no SQL store (no sqlalchemy)
    store = (tmp_path / "mlruns").as_uri()
    cfg = load_config(None, ["data.categories=[a, b]", f"logging.mlflow_tracking_uri={store}",
                             "logging.mlflow_experiment=sinks-test"])
    out = io.StringIO()
    sinks = MetricSinks(cfg, tmp_path, total_steps=4, out=out)
    for s in (1, 2, 3):
        sinks.handle(_step(s, 0.1 * s))
    sinks.handle({"kind": "checkpoint", "step": 2, "final": False})
    # a restart resumed from the checkpoint at step 2: step 3 must disappear from the files
    sinks.handle({"kind": "resume", "step": 2, "lambdas": [0.2, 0.0]})
    sinks.handle(_step(3, 0.35))
    sinks.handle({"kind": "eval", "step": 3, "eval/macro": 80.0, "eval/worst3": 60.0, "eval/gap": 30.0,
                  "per_category": {}})
    sinks.close()
    assert [r[0] for r in read_lambdas_csv(tmp_path)] == [1.0, 2.0, 3.0]
    assert read_lambdas_csv(tmp_path)[-1][1] == 0.35
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in rows] == [("step", 1), ("step", 2), ("checkpoint", 2), ("resume", 2),
                                                      ("step", 3), ("eval", 3)]
    text = out.getvalue()
    assert "resumed from the checkpoint at step 2" in text and "worst-3 60.0" in text and "ETA ? | top λ: a 0.35 (v 0.50), b 0.00" in text
    assert list((tmp_path / "tensorboard").iterdir())
    mlflow.set_tracking_uri(store)
    client = mlflow.tracking.MlflowClient()
    exp = client.get_experiment_by_name("sinks-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert [m.value for m in client.get_metric_history(run.info.run_id, "lambda_a")] == [0.1, 0.2, 0.30000000000000004, 0.35]
    assert client.get_metric_history(run.info.run_id, "eval_worst3")[0].value == 60.0
    assert run.data.params["dual.eta"] == "0.5"


def _plain_sinks(tmp_path: Path, total: int = 10) -> tuple[MetricSinks, io.StringIO]:
    cfg = load_config(None, ["data.categories=[a, b]", "logging.tensorboard=false"])
    out = io.StringIO()
    return MetricSinks(cfg, tmp_path, total_steps=total, out=out), out


def _kinds_steps(run_dir: Path) -> list[tuple[str, int]]:
    return [(r["kind"], r["step"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def test_torn_last_lines_are_dropped_on_resume_and_counted(tmp_path: Path) -> None:
    sinks, out = _plain_sinks(tmp_path)
    for s in (1, 2, 3):
        sinks.handle(_step(s, 0.1 * s))
    # a disk-full write cut both files mid-line (the last line has no newline and is incomplete)
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"kind": "step", "step": 4, "lo')
    with (tmp_path / "lambdas.csv").open("a") as fh:
        fh.write("4,0.4")
    sinks.handle({"kind": "resume", "step": 2, "lambdas": [0.2, 0.0]})
    assert _kinds_steps(tmp_path) == [("step", 1), ("step", 2), ("resume", 2)]
    assert [r[0] for r in read_lambdas_csv(tmp_path)] == [1.0, 2.0]
    text = out.getvalue()
    assert "resumed from the checkpoint at step 2 with the saved lambda; removed 1 newer step rows" in text
    assert "metrics.jsonl: dropped 1 torn line (a write was cut off, e.g. disk full or a kill)" in text
    assert "lambdas.csv: dropped 1 torn line (a write was cut off, e.g. disk full or a kill)" in text


def test_reopening_repairs_a_torn_line_before_appending(tmp_path: Path) -> None:
    sinks, _ = _plain_sinks(tmp_path)
    sinks.handle(_step(1, 0.1))
    sinks.close()
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"kind": "st')
    with (tmp_path / "lambdas.csv").open("a") as fh:
        fh.write("2,0.2,0.")
    again, out = _plain_sinks(tmp_path)  # a rerun of the driver on the same run directory
    again.handle(_step(2, 0.2))
    assert _kinds_steps(tmp_path) == [("step", 1), ("step", 2)]
    assert read_lambdas_csv(tmp_path) == [[1.0, 0.1, 0.0], [2.0, 0.2, 0.0]]
    assert out.getvalue().count("dropped 1 torn line") == 2


def test_reset_cuts_everything_back_to_step_zero(tmp_path: Path) -> None:
    sinks, out = _plain_sinks(tmp_path)
    sinks.handle({"kind": "reset", "step": 0})  # every fresh start sends one: nothing to say yet
    assert out.getvalue() == "" and _kinds_steps(tmp_path) == [("reset", 0)]
    for s in (1, 2):
        sinks.handle(_step(s, 0.1 * s))
    sinks.handle({"kind": "eval", "step": 0, "eval/macro": 1.0, "per_category": {}})
    sinks.handle({"kind": "reset", "step": 0})  # workers restarted before any checkpoint was registered
    sinks.handle(_step(1, 0.5))
    assert _kinds_steps(tmp_path) == [("reset", 0), ("step", 1)]
    assert read_lambdas_csv(tmp_path) == [[1.0, 0.5, 0.0]]
    assert sinks.last_eval is None
    assert ("restarted from step 0 (no checkpoint was restored): metrics.jsonl and lambdas.csv reset "
            "(4 rows removed)") in out.getvalue()
    sinks.handle({"kind": "resume", "step": 0, "lambdas": [0.0, 0.0]})  # a resume at step 0 is a reset too
    assert _kinds_steps(tmp_path) == [("resume", 0)] and read_lambdas_csv(tmp_path) == []


def test_progress_line_eta_and_warnings_once(tmp_path: Path) -> None:
    sinks, out = _plain_sinks(tmp_path, total=100)
    for s in range(1, 31):
        sinks.handle({**_step(s, 0.01 * s), "step_time_s": 100.0 if s <= 10 else 2.0 + (s % 2)})
    # ETA: the last 20 step times (2, 3, 2, 3, ...) average 2.5 s; 70 steps left -> 175 s
    assert sinks.eta_seconds(30) == 175.0
    lines = out.getvalue().splitlines()
    assert lines[-1] == ("step 30/100 | loss 0.5000 | acc 0.75 | 10.0 pairs/s | lr 1.00e-04 | ETA 2m55s | "
                         "top λ: a 0.30 (v 0.50), b 0.00")
    for s in (30, 31, 32):
        sinks.handle({"kind": "warning", "step": s, "message": "no full step left in the data"})
    sinks.close()
    text = out.getvalue()
    assert text.count("WARNING at step 30: no full step left in the data") == 1 and "WARNING at step 31" not in text
    assert "(the warning 'no full step left in the data' repeated 2 more times; see metrics.jsonl)" in text


@pytest.mark.parametrize(("seconds", "text"), [(0.4, "0s"), (42, "42s"), (65, "1m05s"), (3599.6, "1h00m"),
                                                (3725, "1h02m"), (float("nan"), "?")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_atomic_write_replaces_whole_or_nothing(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    atomic_write_text(target, '{"status": "running"}')
    atomic_write_text(target, '{"status": "finished"}')
    assert target.read_text() == '{"status": "finished"}'
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]  # fails mid-write
    assert target.read_text() == '{"status": "finished"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temp file left behind
