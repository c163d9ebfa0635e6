"""MarginController: the driver-side owner of the per-category dual state (a Ray actor).

Rank 0 sends the globally all-reduced per-category statistics ``(n, v)`` and the step's
metrics row after every optimizer step; the controller applies
:meth:`catdpo_ray.dual.DualState.update` (which applies the projected ascent every
``dual.update_every`` calls) and returns the current ``lambda``, binding mask and the full dual
state, which rank 0 broadcasts / mirrors. The controller keeps the metrics and lambda history that
the driver drains to show progress and to write ``metrics.jsonl`` / ``lambdas.csv``.

Every (re)start of the worker group begins with :meth:`begin`: with the dual state of the
checkpoint the workers actually loaded, or with ``None`` when they start from step 0 -- then the
state is reset to ``lambda_init`` and the sinks are cut back to step 0, so a restart without a
checkpoint never keeps the lost steps' lambda, window or rows (RAY_DEEPSPEED_NOTES.md pitfalls 8, 15).

Survival: the actor is created with ``max_restarts=-1``; a restarted actor has lost its state, so
it answers the next :meth:`step` with ``{"resync": True}`` instead of applying it. Rank 0 then
re-seeds it with its mirror of the last returned state (:meth:`begin` with ``kind="controller_restored"``),
replays the rows the driver may not have drained (:meth:`replay`), and resends the step. The sinks
drop rows they have already written, so no row is lost or doubled.

The class is plain Python (unit-testable); the driver wraps it with ``ray.remote``.
"""

from __future__ import annotations

from typing import Any

import torch

from catdpo_ray.dual import DualState


class MarginController:
    """Owns a :class:`DualState` and the run's step history."""

    def __init__(
        self,
        categories: list[str],
        *,
        eta: float,
        epsilon: float | list[float],
        lambda_init: float | list[float],
        lambda_max: float,
        update_every: int,
    ) -> None:
        self.categories = list(categories)
        self._args = {"eta": eta, "epsilon": epsilon, "lambda_init": lambda_init, "lambda_max": lambda_max,
                      "update_every": update_every}
        self.state = self._fresh_state()
        self._pending: list[dict[str, Any]] = []
        #: The last step applied; ``None`` until a worker group has called :meth:`begin` (a restarted
        #: actor is in that state too, which is how :meth:`step` detects that it lost its state).
        self.last_step: int | None = None

    def _fresh_state(self) -> DualState:
        return DualState(len(self.categories), **self._args)

    def current(self) -> dict[str, Any]:
        """The current lambda and binding mask as plain floats (float64, bit-exact), and the state."""
        return {"lambdas": self.state.lambdas.tolist(), "binding": [float(b) for b in self.state.binding.tolist()],
                "state": self.state.state_dict()}

    def begin(self, state: dict[str, Any] | None, step: int, info: dict[str, Any] | None = None,
              kind: str = "resume") -> dict[str, Any]:
        """Start (or restart) from a checkpoint's dual ``state`` at ``step``, or from scratch (``None``, step 0).

        ``info``: what the worker restored besides (checkpoint, DeepSpeed global step, optimizer step, lr).
        ``kind``: ``resume`` (a worker-group start; the sinks cut their files back to ``step``) or
        ``controller_restored`` (this actor was restarted mid-run; nothing is cut).
        """
        if state is None:
            self.state = self._fresh_state()
        else:
            self.state = self._fresh_state()
            self.state.load_state_dict(state)
        self.last_step = step
        self._pending.append({"kind": kind, "step": step, "lambdas": self.state.lambdas.tolist(),
                              "from_checkpoint": state is not None, **(info or {})})
        return self.current()

    def step(self, step: int, counts: list[float], violations: list[float], row: dict[str, Any]) -> dict[str, Any]:
        """Apply one step's global ``(n, v)``; record ``row``; return the new lambda, binding and state.

        Returns ``{"resync": True}`` (and applies nothing) when this actor does not hold the state of
        step ``step - 1`` (it was restarted, or a step was skipped).
        """
        if self.last_step is None or step != self.last_step + 1:
            return {"resync": True, "last_step": self.last_step}
        self.state.update(torch.tensor(violations, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64))
        self.last_step = step
        current = self.current()
        self._pending.append(
            {**row, "kind": "step", "step": step, "n": counts, "v": violations, "lambdas": current["lambdas"],
             "dual_updates": self.state.num_updates}
        )
        return current

    def record(self, row: dict[str, Any]) -> None:
        """Record a non-step event (eval results, checkpoint, warning) for the driver."""
        self._pending.append(row)

    def replay(self, rows: list[dict[str, Any]]) -> None:
        """Re-record rows a restarted actor may have lost before the driver drained them."""
        self._pending.extend(rows)

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict()

    def drain(self) -> list[dict[str, Any]]:
        """Rows recorded since the last drain (the driver polls this)."""
        rows, self._pending = self._pending, []
        return rows


class ControllerLink:
    """Rank 0's handle on the (possibly restarted) MarginController actor.

    Mirrors the last dual state the controller returned and the rows it was sent since, so that
    a controller that lost its state (Ray restarted the actor) is re-seeded and nothing is lost.
    """

    #: Rows kept for replay: more than the driver's drain interval can leave undrained.
    KEEP_ROWS = 512

    def __init__(self, actor: Any) -> None:
        from collections import deque

        self.actor = actor
        self.mirror: dict[str, Any] | None = None
        self.step_index: int = 0
        self._rows: deque[dict[str, Any]] = deque(maxlen=self.KEEP_ROWS)
        self.restorations = 0

    def _get(self, ref: Any) -> Any:
        import ray

        return ray.get(ref)

    def begin(self, state: dict[str, Any] | None, step: int, info: dict[str, Any]) -> dict[str, Any]:
        current = self._get(self.actor.begin.remote(state, step, info))
        self.mirror, self.step_index = current["state"], step
        self._rows.clear()
        return current

    def step(self, step: int, counts: list[float], violations: list[float], row: dict[str, Any]) -> dict[str, Any]:
        current = self._get(self.actor.step.remote(step, counts, violations, row))
        if current.get("resync"):
            # The actor was restarted and lost its state: re-seed it from our mirror of step - 1, replay
            # the rows the driver may not have drained, then apply this step once.
            self.restorations += 1
            self._get(self.actor.begin.remote(self.mirror, self.step_index, {"restorations": self.restorations},
                                              "controller_restored"))
            self._get(self.actor.replay.remote(list(self._rows)))
            current = self._get(self.actor.step.remote(step, counts, violations, row))
            if current.get("resync"):
                raise RuntimeError(f"the MarginController could not be re-seeded at step {step}: {current}")
        self.mirror, self.step_index = current["state"], step
        self._rows.append({**row, "kind": "step", "step": step, "n": counts, "v": violations,
                           "lambdas": current["lambdas"], "dual_updates": current["state"]["num_updates"]})
        return current

    def record(self, row: dict[str, Any]) -> None:
        self._get(self.actor.record.remote(row))
        self._rows.append(row)

    def state_dict(self) -> dict[str, Any]:
        """The dual state after the last applied step (the mirror: no actor round trip)."""
        if self.mirror is None:
            raise RuntimeError("ControllerLink.state_dict before begin()")
        return self.mirror
