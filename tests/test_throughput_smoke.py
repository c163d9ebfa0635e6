"""Smoke test of ``benchmarks/throughput.py``'s bare-loop part, so the benchmark does not rot.

A few pairs, a few steps, in-process: it proves the benchmark still builds its data through the
trainer's tokenization, trains the tiny model with both reference modes, and reports one timed step per
optimizer step with the pairs and the non-padding tokens the step saw (the numbers the table is built
from). It does not time anything.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def throughput() -> ModuleType:
    spec = importlib.util.spec_from_file_location("catdpo_bench_throughput", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("reference", ["online", "precompute"])
def test_bare_loop_runs_and_counts(throughput: ModuleType, tiny_model_dir: str, reference: str) -> None:
    columns, model_path, pad_id, _ = throughput.tokenized_pairs(max_rows=12)
    assert len(columns["chosen_start"]) == 12
    out = throughput.bare_loop(columns, model_path, pad_id, steps=3, micro_batch=2, threads=1, reference=reference)
    assert len(out["step_times"]) == len(out["step_pairs"]) == len(out["step_tokens"]) == 3
    assert out["step_pairs"] == [2, 2, 2]
    # Non-padding tokens of 2 chosen + 2 rejected sequences: each at least its prompt and one response token.
    starts = [int(s) for s in columns["chosen_start"][:2]]
    assert out["step_tokens"][0] >= 2 * sum(s + 1 for s in starts)
    assert all(t > 0 and math.isfinite(t) for t in out["step_times"])
    assert ("reference_s" in out["phases"]) == (reference == "precompute")


def test_default_rows_cover_the_issue(throughput: ModuleType) -> None:
    """The table compares the floor, TRL with and without precompute, and the trainer's target row."""
    labels = [r.label for r in throughput.default_rows()]
    assert {"bare-1t-online", "bare-2t-online", "bare-2t-precompute", "trl", "trl-precompute"} <= set(labels)
    assert "catdpo-2w-z2-precompute-packauto" in labels
    assert len(labels) == len(set(labels))
