"""Where a worker's start-up time goes: wall-clock marks from process start to the end of the first step.

On a 2-core machine a tiny run spends more time starting than training; on a GPU cluster a 13B run
spends minutes loading weights and building the engine. Neither is visible from outside the worker
(the driver only sees ``fit()`` start and the first step row), so every worker start (the first and
each restart) marks its own phases and rank 0 sends them to the driver as one ``startup`` row of
``metrics.jsonl``, printed as one console line.

Phases, in order (seconds each; wall clock, ``time.time()``):

- ``launch``: the worker process's creation (``psutil``) to the training function's first line: Ray
  starting the actor, Ray Train's worker set-up, the torch process group (gloo/NCCL) and the dataset
  shards. ``None`` in local mode (the function runs in the driver's own process).
- ``import``: DeepSpeed (and what it pulls in) imported in the worker; in local mode, the in-process
  process group's set-up.
- ``tokenizer``, ``model_and_engine`` (every ``from_pretrained`` plus ``deepspeed.initialize``),
  ``restore`` (checkpoint verification and load, the MarginController's ``begin``, the lambda broadcast).
- ``first_batch``: the first step's micro-batches from this rank's training dataset (its iterator starts).
- ``first_step``: the rest of step 1 (forward, backward, optimizer step, all-reduce, controller update).

``fit_to_entry_s`` (the driver's ``fit()`` call to the function's first line: the controller actor,
placement group and worker group) is computed by the driver from ``entry_time``; the two clocks are the
same machine's for a single-node run, and NTP-close across nodes.
"""

from __future__ import annotations

import time
from typing import Any

PHASES = ("launch", "import", "tokenizer", "model_and_engine", "restore", "first_batch", "first_step")


def _process_start_time() -> float | None:
    """This process's creation time (seconds since the epoch), or None where psutil cannot say."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - a missing number, never a failed run
        return None


class StartupClock:
    """Marks of one worker start. ``mark(phase)`` closes ``phase`` at now; phases never marked are absent.

    Args:
        own_process: the training function runs in a worker process of its own (False in local mode,
            where the process start is the driver's and ``launch`` is meaningless).
    """

    def __init__(self, *, own_process: bool) -> None:
        self.entry_time = time.time()
        self._last = self.entry_time
        self.seconds: dict[str, float | None] = {}
        started = _process_start_time() if own_process else None
        self.seconds["launch"] = max(0.0, self.entry_time - started) if started is not None else None

    def mark(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown start-up phase {phase!r}; known: {', '.join(PHASES)}")
        now = time.time()
        self.seconds[phase] = now - self._last
        self._last = now

    def row(self, step: int) -> dict[str, Any]:
        """The ``startup`` row of rank 0 (``step``: the step this start resumed from, 0 for a fresh one)."""
        return {"kind": "startup", "step": step, "entry_time": self.entry_time,
                "seconds": {p: self.seconds[p] for p in PHASES if p in self.seconds}}


def describe(row: dict[str, Any], fit_start_time: float | None) -> str:
    """One console line for a ``startup`` row: the total to the end of step 1 and its largest phases."""
    seconds = {p: s for p, s in row.get("seconds", {}).items() if s is not None}
    parts = []
    if fit_start_time is not None and row.get("entry_time") is not None:
        seconds = {"fit_to_entry": max(0.0, row["entry_time"] - fit_start_time), **seconds}
    total = sum(s for p, s in seconds.items() if p != "launch")  # launch lies inside fit_to_entry
    if "fit_to_entry" not in seconds and "launch" in seconds:
        total += seconds["launch"]
    for phase, sec in seconds.items():
        parts.append(f"{phase.replace('_', ' ')} {sec:.1f}s")
    where = f"from step {row['step']}" if row.get("step") else "fresh start"
    return f"worker start ({where}) to the end of its first step: {total:.1f}s = " + ", ".join(parts)
