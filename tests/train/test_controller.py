"""MarginController (plain class) and rank 0's ControllerLink: applies DualState, records rows,
resets on a start without a checkpoint, re-seeds on resume, and survives a lost actor."""

from __future__ import annotations

from typing import Any

import pytest

from catdpo_ray.train.controller import ControllerLink, MarginController


def _controller(lambda_init: float = 1.0) -> MarginController:
    return MarginController(["a", "b"], eta=0.5, epsilon=0.1, lambda_init=lambda_init, lambda_max=10.0, update_every=1)


def test_step_begin_drain() -> None:
    c = _controller()
    c.begin(None, 0)
    out = c.step(1, [4.0, 0.0], [2.0, 0.0], {"loss": 0.5})
    # a: 1 + 0.5 * (2/4 - 0.1) = 1.2 ; b absent -> keeps 1.0
    assert out["lambdas"] == pytest.approx([1.2, 1.0])
    saved = out["state"]
    c.step(2, [2.0, 2.0], [2.0, 2.0], {"loss": 0.4})
    assert c.current()["lambdas"] == pytest.approx([1.65, 1.45])
    fresh = _controller(lambda_init=0.0)
    assert fresh.begin(saved, 1)["lambdas"] == pytest.approx([1.2, 1.0])
    rows = c.drain()
    assert [r["kind"] for r in rows] == ["resume", "step", "step"]
    assert rows[0] == {"kind": "resume", "step": 0, "lambdas": [1.0, 1.0], "from_checkpoint": False}
    assert [r["step"] for r in rows[1:]] == [1, 2] and rows[1]["loss"] == 0.5 and rows[1]["n"] == [4.0, 0.0]
    assert rows[2]["lambdas"] == pytest.approx([1.65, 1.45])
    assert c.drain() == []
    assert fresh.drain()[0] == {"kind": "resume", "step": 1, "lambdas": pytest.approx([1.2, 1.0]), "from_checkpoint": True}


def test_a_start_without_checkpoint_resets_lost_steps() -> None:
    """Workers restarted before any checkpoint: the controller must not keep the lost steps' lambda,
    window or update count (issue 11, item 1)."""
    c = _controller()
    c.begin(None, 0)
    c.step(1, [4.0, 4.0], [4.0, 4.0], {})
    c.step(2, [4.0, 4.0], [4.0, 4.0], {})
    assert c.state.num_updates == 2 and c.current()["lambdas"] != [1.0, 1.0]
    c.begin(None, 0)  # the restarted worker group found no checkpoint
    assert c.current()["lambdas"] == [1.0, 1.0] and c.state.num_updates == 0 and c.state.num_calls == 0


def test_step_out_of_order_asks_for_resync() -> None:
    c = _controller()
    assert c.step(1, [1.0, 1.0], [0.0, 0.0], {}) == {"resync": True, "last_step": None}  # never began: restarted
    c.begin(None, 0)
    c.step(1, [1.0, 1.0], [0.0, 0.0], {})
    assert c.step(3, [1.0, 1.0], [0.0, 0.0], {})["resync"] is True  # a step was skipped
    assert c.state.num_calls == 1  # nothing applied


class _FakeRef:
    def __init__(self, value: Any) -> None:
        self.value = value


class _LocalActor:
    """A MarginController behind the ``.method.remote`` calling convention, with ``ray.get`` replaced
    by unwrapping (pure test of the link's logic; the real actor is exercised in tests/faults)."""

    def __init__(self) -> None:
        self.inner = _controller()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        class _Remote:
            @staticmethod
            def remote(*args: Any) -> _FakeRef:
                return _FakeRef(method(*args))

        return _Remote()


class _Link(ControllerLink):
    def _get(self, ref: Any) -> Any:
        return ref.value


def test_link_reseeds_a_restarted_controller_exactly() -> None:
    """The actor loses its state after step 2 (Ray restarted it): the link re-seeds it from its mirror,
    replays the undrained rows, applies step 3 once; lambda equals an uninterrupted controller's."""
    steps = [([4.0, 2.0], [2.0, 1.0]), ([2.0, 2.0], [0.0, 2.0]), ([3.0, 1.0], [3.0, 0.0]), ([1.0, 1.0], [1.0, 1.0])]
    plain = _controller()
    plain.begin(None, 0)
    expected = [plain.step(i + 1, n, v, {"i": i})["lambdas"] for i, (n, v) in enumerate(steps)]

    actor = _LocalActor()
    link = _Link(actor)
    link.begin(None, 0, {})
    got = [link.step(1, *steps[0], {"i": 0})["lambdas"], link.step(2, *steps[1], {"i": 1})["lambdas"]]
    actor.inner.drain()  # the driver drained step 1 and 2 ...
    got.append(link.step(3, *steps[2], {"i": 2})["lambdas"])
    actor.inner = _controller(lambda_init=0.0)  # ... then the actor died before step 3's row was drained
    got.append(link.step(4, *steps[3], {"i": 3})["lambdas"])
    assert got == expected  # bit for bit
    assert link.restorations == 1
    rows = actor.inner.drain()
    assert rows[0]["kind"] == "controller_restored" and rows[0]["step"] == 3
    # the undrained rows are replayed (the sinks drop the ones they already wrote), then step 4
    assert [(r["kind"], r["step"]) for r in rows[1:]] == [("step", 1), ("step", 2), ("step", 3), ("step", 4)]
    assert rows[-1]["lambdas"] == expected[-1]
