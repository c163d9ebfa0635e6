"""Fault injection for the fault-tolerance tests (``tests/faults``): die at a named point, once.

The driver copies ``$CATDPO_FAULT`` into the workers' plan; a worker whose rank, step and point
match kills its own process with ``os._exit`` (Ray-managed workers: the way a node loss or an
OOM kill looks to Ray Train) or, in Ray Train local mode where the worker is the driver's own
process, raises :class:`InjectedFault`. A marker file makes it fire once, so the restarted worker
group runs through. Format: ``POINT:STEP:RANK:MARKER_PATH`` with POINT one of

- ``step``: after optimizer step STEP (and its dual update), before any checkpoint of that step;
- ``ckpt_write``: inside the checkpoint of step STEP, after DeepSpeed wrote its files, before this
  rank's manifest and the report (a checkpoint torn mid-write);
- ``ckpt_done``: right after the checkpoint of step STEP was reported.

Unset (the normal case) costs one dictionary lookup per point.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

POINTS = ("step", "ckpt_write", "ckpt_done")


class InjectedFault(RuntimeError):
    """The local-mode form of an injected worker death."""


def parse(spec: str | None) -> dict[str, Any] | None:
    """``POINT:STEP:RANK:MARKER`` -> dict, or None when unset."""
    if not spec:
        return None
    point, step, rank, marker = spec.split(":", 3)
    if point not in POINTS:
        raise ValueError(f"CATDPO_FAULT point {point!r} is not one of {POINTS}")
    return {"point": point, "step": int(step), "rank": int(rank), "marker": marker}


def from_environment() -> dict[str, Any] | None:
    """The driver reads ``$CATDPO_FAULT`` once and hands it to the workers in their plan."""
    return parse(os.environ.get("CATDPO_FAULT"))


def maybe_fail(plan: dict[str, Any], point: str, step: int, rank: int, *, local: bool) -> None:
    """Die here if the plan's fault names this point, step and rank and has not fired yet."""
    fault = plan.get("fault")
    if not fault or fault["point"] != point or fault["step"] != step or fault["rank"] != rank:
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.write_text(f"{point}:{step}:{rank}\n")
    if local:
        raise InjectedFault(f"injected fault at {point} of step {step} on rank {rank}")
    os._exit(1)
