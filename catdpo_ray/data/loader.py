"""Load a split: source rows -> validation (strict or lenient) -> pair construction, with counts.

Strict mode raises :class:`~catdpo_ray.data.schema.BadRowError` on the first bad row, naming
the source, row number, field and problem. Lenient mode (default) writes bad rows with their
reason to ``quarantine.jsonl`` and counts them; :class:`LoadReport` tells the user how many.
Nothing is dropped silently: every row ends up kept, swapped, dropped (counted by reason, exact
duplicates included) or quarantined (counted by field).

``quarantine.jsonl`` holds each (source, split) once: loading a split replaces that split's
earlier entries (a rerun or resume does not append them again), keeps the other split's, and
is written atomically, so the file's line count always equals the reports' quarantine counts.
A split that yields no pair at all (empty file, every row bad, every row dropped) is refused by
:func:`load_split` with :class:`EmptySplitError`, before any tokenization or Ray work.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catdpo_ray.config import DataConfig
from catdpo_ray.data.pairs import construct_pair, pair_summary
from catdpo_ray.data.quarantine import write_quarantine
from catdpo_ray.data.schema import BadRowError, RowProblem, apply_column_map, normalize_row
from catdpo_ray.data.sources import RawRow, UnparsableRow, bundled_path, read_file, read_hub

#: Outcome counted for an exact duplicate row dropped under ``data.duplicates=drop``.
DUPLICATE_OUTCOME = "dropped:duplicate"


class EmptySplitError(ValueError):
    """A split that yields no preference pair: nothing to train or evaluate on."""


@dataclass
class LoadReport:
    """What happened to every row of one split.

    ``duplicates`` counts valid rows identical to an earlier row of the same split (every field,
    byte for byte after JSON normalisation); with ``duplicate_policy="drop"`` they are also
    counted under the outcome ``dropped:duplicate``.
    """

    source: str
    rows: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    quarantined: Counter[str] = field(default_factory=Counter)
    quarantine_file: str | None = None
    duplicates: int = 0
    duplicate_policy: str = "drop"

    @property
    def num_pairs(self) -> int:
        return self.outcomes["kept"] + self.outcomes["swapped"]

    @property
    def num_quarantined(self) -> int:
        return sum(self.quarantined.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows": self.rows,
            "pairs": self.num_pairs,
            "outcomes": dict(self.outcomes),
            "quarantined": dict(self.quarantined),
            "quarantine_file": self.quarantine_file,
            "duplicates": self.duplicates,
            "duplicate_policy": self.duplicate_policy,
        }

    def describe(self) -> str:
        parts = [f"{self.source}: {self.rows} rows -> {self.num_pairs} pairs"]
        parts += [f"{k}={v}" for k, v in sorted(self.outcomes.items())]
        if self.duplicates and self.duplicate_policy == "keep":
            parts.append(f"duplicates={self.duplicates} (kept: data.duplicates=keep)")
        if self.num_quarantined:
            parts.append(f"QUARANTINED={self.num_quarantined} ({dict(self.quarantined)}) -> {self.quarantine_file}")
        return ", ".join(parts)


def split_source(cfg: DataConfig, split: str) -> tuple[str, Iterator[tuple[int, RawRow]]]:
    """(display name, row iterator) of ``split`` (``train``/``test``) under ``cfg``."""
    if cfg.hub_name:
        hub_split = cfg.hub_train_split if split == "train" else cfg.hub_test_split
        name = f"hub:{cfg.hub_name}/{cfg.hub_config or ''}[{hub_split}]"
        return name, read_hub(cfg.hub_name, config=cfg.hub_config, split=hub_split, revision=cfg.hub_revision)
    location = cfg.train if split == "train" else cfg.test
    path = bundled_path(split) if location == "bundled" else Path(location)
    return str(path), read_file(path)


def _row_key(raw: dict[str, Any]) -> bytes:
    """A 16-byte digest of a row's full content: equal digests = exact duplicate rows.

    Key order does not matter (``sort_keys``); a digest instead of the text keeps memory at
    16 bytes per row on corpora of hundreds of thousands of rows.
    """
    text = json.dumps(raw, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def build_pairs(
    rows: Iterable[tuple[int, RawRow]],
    *,
    source: str,
    cfg: DataConfig,
    pair_mode: str,
    require_categories: bool = True,
    quarantine_path: str | Path | None = None,
    max_rows: int | None = None,
    split: str | None = None,
) -> tuple[list[dict[str, Any]], LoadReport]:
    """Validate, de-duplicate and pair ``rows``. See the module docstring for strict/lenient.

    Args:
        rows: ``(row_number, raw row)`` from :mod:`catdpo_ray.data.sources`.
        source: display name of the source (file path or ``hub:...``), used in messages.
        cfg: the data section (categories, column map, validation, duplicates).
        pair_mode: a key of :data:`catdpo_ray.data.pairs.PAIR_RULES`.
        require_categories: rows must carry both harm-category fields (Cat-DPO needs them).
        quarantine_path: where lenient mode records bad rows (see :func:`write_quarantine`).
        max_rows: stop after this many rows read (duplicates and bad rows count as read).
        split: ``train``/``test``; recorded in quarantine entries so each split is replaced alone.

    Returns:
        (pairs in source order, the split's :class:`LoadReport`).
    """
    category_index = {name: i for i, name in enumerate(cfg.categories)}
    report = LoadReport(source=source, duplicate_policy=cfg.duplicates)
    pairs: list[dict[str, Any]] = []
    bad: list[dict[str, Any]] = []
    seen: set[bytes] = set()
    short = Path(source).name if not source.startswith("hub:") else source
    for row_number, raw in rows:
        if max_rows is not None and report.rows >= max_rows:
            break
        report.rows += 1
        try:
            if isinstance(raw, UnparsableRow):
                raise RowProblem("<line>", raw.reason)
            norm = normalize_row(
                apply_column_map(raw, cfg.column_map),
                category_index=category_index,
                require_categories=require_categories,
            )
        except RowProblem as problem:
            if cfg.validation == "strict":
                raise BadRowError(source, row_number, problem.field, problem.reason) from None
            if quarantine_path is None:
                raise BadRowError(
                    source, row_number, problem.field, problem.reason + " (lenient mode needs a quarantine path)"
                ) from None
            report.quarantined[problem.field] += 1
            raw_text = raw.text if isinstance(raw, UnparsableRow) else json.dumps(raw, default=str)[:2000]
            bad.append({"source": source, "split": split, "row": row_number, "field": problem.field,
                        "reason": problem.reason, "raw": raw_text})
            continue
        # Only valid rows are de-duplicated: a repeated bad row is a bad row each time (quarantined).
        key = _row_key(raw)
        if key in seen:
            report.duplicates += 1
            if cfg.duplicates == "drop":
                report.outcomes[DUPLICATE_OUTCOME] += 1
                continue
        seen.add(key)
        pair, outcome = construct_pair(
            norm, pair_mode, pair_id=f"{short}:{row_number}", num_categories=len(cfg.categories)
        )
        report.outcomes[outcome] += 1
        if pair is not None:
            pairs.append(pair)
    if quarantine_path is not None:
        # Rewritten even when this load found nothing bad: a fixed file must clear its old entries.
        write_quarantine(quarantine_path, source, split, bad)
        report.quarantine_file = str(quarantine_path) if bad else None
    return pairs, report


def _empty_split_message(report: LoadReport, split: str, pair_mode: str) -> str:
    where = f"data.{split} {report.source}" if not report.source.startswith("hub:") else report.source
    if report.rows == 0:
        return f"{where}: no data rows (the {split} split is empty); nothing to {'train' if split == 'train' else 'evaluate'} on"
    if report.num_quarantined == report.rows:
        return (f"{where}: all {report.rows} rows are bad ({dict(sorted(report.quarantined.items()))}); "
                f"see {report.quarantine_file}")
    outcomes = ", ".join(f"{k}={v}" for k, v in sorted(report.outcomes.items()))
    quarantined = f", quarantined={report.num_quarantined}" if report.num_quarantined else ""
    return f"{where}: {report.rows} rows gave 0 pairs under pair mode {pair_mode!r} ({outcomes}{quarantined})"


def load_split(
    cfg: DataConfig,
    split: str,
    *,
    pair_mode: str,
    require_categories: bool = True,
    quarantine_path: str | Path | None = None,
) -> tuple[list[dict[str, Any]], LoadReport]:
    """Read, validate, de-duplicate and pair one split of the configured source.

    Raises:
        EmptySplitError: the split gives no pair (empty file, all rows bad, all rows dropped).
        BadRowError: strict mode, at the first bad row.
        DataFileError / FileNotFoundError: the file cannot be read (named in the message).
    """
    source, rows = split_source(cfg, split)
    max_rows = cfg.max_train_rows if split == "train" else cfg.max_test_rows
    pairs, report = build_pairs(
        rows,
        source=source,
        cfg=cfg,
        pair_mode=pair_mode,
        require_categories=require_categories,
        quarantine_path=quarantine_path,
        max_rows=max_rows,
        split=split,
    )
    if not pairs:
        raise EmptySplitError(_empty_split_message(report, split, pair_mode))
    return pairs, report


def dropped_per_epoch(num_pairs: int, global_batch: int) -> int:
    """Pairs left out of each epoch because they do not fill a last global batch.

    Every rank must take the same number of optimizer steps (a collective per step), so an
    epoch is ``num_pairs // global_batch`` steps of ``global_batch`` pairs and the remaining
    ``num_pairs mod global_batch`` pairs are not trained on in that epoch (with shuffling,
    different ones each epoch). E.g. 100 pairs, micro 4 x accum 2 x 3 workers = 24: 4 steps, 4 dropped.
    """
    if num_pairs < 0:
        raise ValueError(f"num_pairs must be >= 0, got {num_pairs}")
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1, got {global_batch}")
    return num_pairs % global_batch


def describe_dropped(num_pairs: int, global_batch: int) -> str | None:
    """The line to print about :func:`dropped_per_epoch`, or ``None`` when nothing is dropped."""
    dropped = dropped_per_epoch(num_pairs, global_batch)
    if dropped == 0:
        return None
    steps = num_pairs // global_batch
    return (f"{dropped} of {num_pairs} training pairs do not fill a global batch of {global_batch} "
            f"and are left out of each epoch ({steps} steps/epoch)")


def format_category_table(pairs: list[dict[str, Any]], categories: list[str]) -> str:
    """A printable per-category table of pair and safety-gap pair counts."""
    summary = pair_summary(pairs, categories)
    width = max(len(c) for c in categories)
    lines = [f"{'category':<{width}}  pairs  safety_gap", "-" * (width + 19)]
    for name in sorted(categories, key=lambda c: -summary[c]["pairs"]):
        s = summary[name]
        lines.append(f"{name:<{width}}  {s['pairs']:5d}  {s['safety_gap_pairs']:10d}")
    return "\n".join(lines)
