"""Shared helpers for trainer tests: small corpora cut from the bundled data, run readers, replay."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch

from catdpo_ray.data.sources import bundled_path
from catdpo_ray.dual import DualState


def small_corpus(tmp: Path, n_train: int, n_test: int, *, single_category: bool = False) -> tuple[str, str]:
    """First ``n_train``/``n_test`` rows of the bundled splits (optionally only rows whose
    responses carry at most one category each and share it), written as JSONL."""
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        rows = []
        for line in bundled_path(split).read_text().splitlines():
            r = json.loads(line)
            if single_category:
                flagged = {c for key in ("response_0_harm_category", "response_1_harm_category")
                           for c, on in r[key].items() if on}
                if len(flagged) > 1:
                    continue
            rows.append(line)
            if len(rows) == n:
                break
        path = tmp / f"{split}.jsonl"
        path.write_text("\n".join(rows) + "\n")
        out.append(str(path))
    return out[0], out[1]


def read_rows(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == kind]


def read_lambdas_csv(run_dir: Path) -> list[list[float]]:
    with (run_dir / "lambdas.csv").open() as fh:
        body = list(csv.reader(fh))[1:]
    return [[float(x) for x in r] for r in body]


def replay_dual(cfg: Any, steps: list[dict[str, Any]]) -> list[list[float]]:
    """Replay DualState over the logged global (n, v) of each step -> lambda after each step."""
    state = DualState(cfg.num_categories, eta=cfg.dual.eta, epsilon=cfg.dual.epsilon, lambda_init=cfg.dual.lambda_init,
                      lambda_max=cfg.dual.lambda_max, update_every=cfg.dual.update_every)
    out = []
    for row in steps:
        lam = state.update(torch.tensor(row["v"], dtype=torch.float64), torch.tensor(row["n"], dtype=torch.float64))
        out.append(lam.tolist())
    return out


def check_generation_rounds(run: Path, steps: list[dict[str, Any]], every: int) -> None:
    """dual.violation=generation: (n, v) of a step are the judged answers of that step's round (0 between
    rounds, so lambda holds there), exactly the verdicts written to onpolicy.jsonl."""
    lines = [json.loads(line) for line in (run / "onpolicy.jsonl").read_text().splitlines()]
    rounds = [r["step"] for r in lines if r.get("kind") == "rate"]
    assert rounds == [s for s in range(1, len(steps) + 1) if s % every == 0]
    categories = list(steps[0]["violation_rate"])
    for row in steps:
        answers = [r for r in lines if r.get("kind") != "rate" and r["step"] == row["step"] and r["safe"] is not None]
        n = [float(sum(a["category"] == c for a in answers)) for c in categories]
        v = [float(sum(a["category"] == c and not a["safe"] for a in answers)) for c in categories]
        assert (row["n"], row["v"]) == (n, v), row["step"]
        if row["step"] % every:
            assert sum(row["n"]) == 0
    assert sum(sum(r["n"]) for r in steps) > 0
