"""The resume contract: which config keys may change when a run resumes, checked in one place.

A resumed run must equal the uninterrupted one (same weights, λ by category name, metrics), so
it is checked against the config the checkpoint was trained with (``config`` in
``catdpo_state.json``), key by key. A key may differ only if it is listed in
:data:`RESUMABLE_KEYS` (or under a prefix in :data:`RESUMABLE_PREFIXES`): these say how often to
log, evaluate, checkpoint or verify, where to report, how many failures to tolerate, or when to stop, and
change no arithmetic of the steps already taken or still to come. Everything else (lr and schedule,
data, categories, loss, dual, model, ZeRO stage, workers, seed, shuffle, batch sizes ...) is refused
with a message naming every differing key. ``train.max_steps`` and ``train.epochs`` change the
number of planned steps, which is the horizon of the warmup and cosine LR schedule
(:func:`catdpo_ray.train.ds_config.lr_multiplier`): they may change only when that horizon does
not enter the schedule (``lr_schedule=constant`` with ``warmup_ratio=0``), otherwise the steps
already taken followed a different schedule than the resumed ones would.

``data.categories`` in another order is refused, not remapped: the checkpoint's λ vector, the
violation statistics and the category-mask columns all follow the saved order, and a refusal
that names the saved order is safer than a remap that one missed place would silently undo.

The original ``config.yaml`` is never overwritten; each resume appends its allowed overrides to
``resumes.jsonl`` beside it (:func:`record_resume`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from catdpo_ray.train.sinks import atomic_write_text

#: Keys that may change on resume: cadence, reporting, fault tolerance, stopping, where to connect.
RESUMABLE_KEYS: frozenset[str] = frozenset({
    "train.log_every", "train.eval_every", "train.checkpoint_every", "train.stop_after_step",
    "train.eval_before_after", "output.max_failures", "output.num_checkpoints_to_keep", "output.save_final",
    "output.max_shard_size", "dual.check_every",
    "scaling.ray_address", "scaling.placement_strategy", "scaling.plan_check",
})
#: Whole sections that only report or evaluate (``catdpo-ray eval`` / sweeps), never train.
RESUMABLE_PREFIXES: tuple[str, ...] = ("logging.", "eval.", "tune.")
#: Keys that change the planned number of steps: allowed only when the LR schedule ignores it.
HORIZON_KEYS: frozenset[str] = frozenset({"train.max_steps", "train.epochs"})
_ABSENT = "(absent)"


class ResumeRefused(ValueError):
    """The new config differs from the checkpoint's in keys a resume cannot honour."""


@dataclass(frozen=True)
class Change:
    """One differing key: ``allowed`` on resume or not, and ``why`` in words."""

    key: str
    old: Any
    new: Any
    allowed: bool
    why: str = ""

    def describe(self) -> str:
        text = f"{self.key}: {_show(self.old)} -> {_show(self.new)}"
        return f"{text} ({self.why})" if self.why else text


def _show(value: Any) -> str:
    return _ABSENT if value is _ABSENT else json.dumps(value)


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}``, recursively (``model.lora.r``,
    ``data.column_map.prompt``): a difference is reported at the deepest key that differs."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _horizon_free(cfg: dict[str, Any]) -> bool:
    train = cfg.get("train", {})
    return train.get("lr_schedule") == "constant" and float(train.get("warmup_ratio", 1.0)) == 0.0


def diff_for_resume(saved: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """Every key whose value differs between the checkpoint's config and the new one, classified.

    Args:
        saved: ``RunConfig.to_dict()`` the checkpoint was trained with.
        new: ``RunConfig.to_dict()`` of the resuming run.

    Returns:
        Changes sorted by key; a key present in only one of them counts as changed.
    """
    a, b = flatten(saved), flatten(new)
    changes = []
    for key in sorted(set(a) | set(b)):
        old, cur = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if old == cur:
            continue
        if key in RESUMABLE_KEYS or key.startswith(RESUMABLE_PREFIXES):
            changes.append(Change(key, old, cur, True))
        elif key in HORIZON_KEYS:
            ok = _horizon_free(saved) and _horizon_free(new)
            why = "" if ok else ("changes the planned steps, the horizon of the warmup/cosine LR schedule the "
                                 "steps so far followed; allowed only with train.lr_schedule=constant and "
                                 "train.warmup_ratio=0")
            changes.append(Change(key, old, cur, ok, why))
        elif key == "data.categories" and isinstance(old, list) and isinstance(cur, list) and sorted(old) == sorted(cur):
            changes.append(Change(key, old, cur, False, "same names in another order: λ, the violation "
                                                         "statistics and the category columns follow the saved "
                                                         "order; restore it"))
        else:
            changes.append(Change(key, old, cur, False))
    return changes


def check_resume(saved: dict[str, Any], new: dict[str, Any], *, run_name: str = "", step: int | None = None) -> list[Change]:
    """Refuse a resume whose config differs in any key it cannot honour.

    Returns:
        The allowed changes (record them with :func:`record_resume`).

    Raises:
        ResumeRefused: naming every refused key (old -> new) and what to do instead.
    """
    changes = diff_for_resume(saved, new)
    refused = [c for c in changes if not c.allowed]
    if refused:
        where = f"run {run_name!r}" if run_name else "this run"
        at = f" at step {step}" if step is not None else ""
        lines = "\n".join(f"  {c.describe()}" for c in refused)
        raise ResumeRefused(
            f"cannot resume {where} from its checkpoint{at}: {len(refused)} setting(s) differ from the ones it was "
            f"trained with and would make the resumed run differ from an uninterrupted one:\n{lines}\n"
            "To resume, restore the old values. To train with the new ones, start a new run: set another "
            "output.name (or leave it unset for a fresh one). Keys that may change on resume: "
            f"{', '.join(sorted(RESUMABLE_KEYS))}, {', '.join(p + '*' for p in RESUMABLE_PREFIXES)}; "
            "train.max_steps / train.epochs only with a constant LR schedule and no warmup."
        )
    return changes


def record_resume(run_dir: str | Path, changes: list[Change], step: int) -> int:
    """Append this resume (its step and allowed overrides) to ``<run_dir>/resumes.jsonl``.

    The file is rewritten atomically with the valid earlier lines plus the new one, so a torn
    line from a crash never survives and the original ``config.yaml`` stays untouched.

    Returns:
        The resume's number (1 for the first resume of the run).
    """
    path = Path(run_dir) / "resumes.jsonl"
    lines = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                json.loads(line)
                lines.append(line)
            except ValueError:
                continue  # torn by a crash mid-write: dropped, the rest kept
    number = len(lines) + 1
    entry = {"resume": number, "step": step, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "overrides": {c.key: {"old": c.old, "new": c.new} for c in changes if c.allowed}}
    lines.append(json.dumps(entry))
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return number


def write_original_config(run_dir: str | Path, yaml_text: str) -> bool:
    """Write ``config.yaml`` only if the run has none yet (atomically); never overwrite it.

    Returns:
        True if written (a new run), False if the run already had one (a resume or a rerun).
    """
    path = Path(run_dir) / "config.yaml"
    if path.exists():
        return False
    atomic_write_text(path, yaml_text)
    return True
