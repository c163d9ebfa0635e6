"""MarginController (plain class): applies DualState, records rows, re-seeds on resume."""

from __future__ import annotations

import pytest

from catdpo_ray.train.controller import MarginController


def test_step_restore_drain() -> None:
    c = MarginController(["a", "b"], eta=0.5, epsilon=0.1, lambda_init=1.0, lambda_max=10.0, update_every=1)
    out = c.step(1, [4.0, 0.0], [2.0, 0.0], {"loss": 0.5})
    # a: 1 + 0.5 * (2/4 - 0.1) = 1.2 ; b absent -> keeps 1.0
    assert out["lambdas"] == pytest.approx([1.2, 1.0])
    saved = c.state_dict()
    c.step(2, [2.0, 2.0], [2.0, 2.0], {"loss": 0.4})
    assert c.current()["lambdas"] == pytest.approx([1.65, 1.45])
    fresh = MarginController(["a", "b"], eta=0.5, epsilon=0.1, lambda_init=0.0, lambda_max=10.0, update_every=1)
    assert fresh.restore(saved, 1)["lambdas"] == pytest.approx([1.2, 1.0])
    rows = c.drain()
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] == 0.5 and rows[0]["n"] == [4.0, 0.0]
    assert rows[1]["lambdas"] == pytest.approx([1.65, 1.45])
    assert c.drain() == []
    assert fresh.drain()[0] == {"kind": "resume", "step": 1, "lambdas": pytest.approx([1.2, 1.0])}
