"""MarginController: the driver-side owner of the per-category dual state (a Ray actor).

Rank 0 sends the globally all-reduced per-category statistics ``(n, v)`` and the step's
metrics row after every optimizer step; the controller applies
:meth:`catdpo_ray.dual.DualState.update` (which applies the projected ascent every
``dual.update_every`` calls) and returns the current ``lambda`` and binding mask, which rank 0
broadcasts to all ranks. The controller keeps the metrics and lambda history that the driver
drains to show progress and to write ``metrics.jsonl`` / ``lambdas.csv``.

On resume the actor starts empty (RAY_DEEPSPEED_NOTES.md pitfall 8): rank 0 re-seeds it from
the checkpoint's dual state via :meth:`restore`, so lambda never resets.

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
        self.state = DualState(
            len(categories),
            eta=eta,
            epsilon=epsilon,
            lambda_init=lambda_init,
            lambda_max=lambda_max,
            update_every=update_every,
        )
        self._pending: list[dict[str, Any]] = []

    def current(self) -> dict[str, list[float]]:
        """The current lambda and binding mask as plain floats (float64, bit-exact)."""
        return {"lambdas": self.state.lambdas.tolist(), "binding": [float(b) for b in self.state.binding.tolist()]}

    def step(self, step: int, counts: list[float], violations: list[float], row: dict[str, Any]) -> dict[str, list[float]]:
        """Apply one step's global ``(n, v)``; record ``row``; return the new lambda and binding."""
        self.state.update(torch.tensor(violations, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64))
        current = self.current()
        self._pending.append(
            {**row, "kind": "step", "step": step, "n": counts, "v": violations, "lambdas": current["lambdas"],
             "dual_updates": self.state.num_updates}
        )
        return current

    def record(self, row: dict[str, Any]) -> None:
        """Record a non-step event (eval results, checkpoint, resume) for the driver."""
        self._pending.append(row)

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict()

    def restore(self, state: dict[str, Any], step: int, info: dict[str, Any] | None = None) -> dict[str, list[float]]:
        """Re-seed from a checkpoint's dual state (resume); tell the driver where we resumed.

        ``info``: what the worker restored besides (DeepSpeed global step, optimizer step, lr).
        """
        self.state.load_state_dict(state)
        self._pending.append({"kind": "resume", "step": step, "lambdas": self.state.lambdas.tolist(), **(info or {})})
        return self.current()

    def drain(self) -> list[dict[str, Any]]:
        """Rows recorded since the last drain (the driver polls this)."""
        rows, self._pending = self._pending, []
        return rows
