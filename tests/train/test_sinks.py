"""Driver-side sinks: metrics.jsonl, lambdas.csv, resume truncation, TensorBoard, MLflow (real, sqlite)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from catdpo_ray.config import load_config
from catdpo_ray.train.sinks import MetricSinks
from tests.train.helpers import read_lambdas_csv


def _step(step: int, lam: float) -> dict:
    return {"kind": "step", "step": step, "loss": 0.5, "dpo_loss": 0.4, "reward_acc": 0.75, "pairs_per_s": 10.0,
            "tokens_per_s": 100.0, "lr": 1e-4, "lambdas": [lam, 0.0], "violation_rate": {"a": 0.5, "b": None},
            "n": [2.0, 0.0], "v": [1.0, 0.0]}


def test_files_resume_truncation_tensorboard_mlflow(tmp_path: Path) -> None:
    import mlflow

    db = tmp_path / "mlflow.db"
    cfg = load_config(None, ["data.categories=[a, b]", f"logging.mlflow_tracking_uri=sqlite:///{db}",
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
    assert "resumed from the checkpoint at step 2" in text and "worst-3 60.0" in text and "top λ: a λ=0.35" in text
    assert list((tmp_path / "tensorboard").iterdir())
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    client = mlflow.tracking.MlflowClient()
    exp = client.get_experiment_by_name("sinks-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert [m.value for m in client.get_metric_history(run.info.run_id, "lambda_a")] == [0.1, 0.2, 0.30000000000000004, 0.35]
    assert client.get_metric_history(run.info.run_id, "eval_worst3")[0].value == 60.0
    assert run.data.params["dual.eta"] == "0.5"
