"""Load a split: source rows -> validation (strict or lenient) -> pair construction, with counts.

Strict mode raises :class:`~catdpo_ray.data.schema.BadRowError` on the first bad row, naming
the source, row number, field and problem. Lenient mode (default) appends bad rows with their
reason to ``quarantine.jsonl`` and counts them; :class:`LoadReport` tells the user how many.
Nothing is dropped silently: every row ends up kept, swapped, dropped (counted by reason) or
quarantined (counted by field).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catdpo_ray.config import DataConfig
from catdpo_ray.data.pairs import construct_pair, pair_summary
from catdpo_ray.data.schema import BadRowError, RowProblem, apply_column_map, normalize_row
from catdpo_ray.data.sources import RawRow, UnparsableRow, bundled_path, read_file, read_hub


@dataclass
class LoadReport:
    """What happened to every row of one split."""

    source: str
    rows: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    quarantined: Counter[str] = field(default_factory=Counter)
    quarantine_file: str | None = None

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
        }

    def describe(self) -> str:
        parts = [f"{self.source}: {self.rows} rows -> {self.num_pairs} pairs"]
        parts += [f"{k}={v}" for k, v in sorted(self.outcomes.items())]
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


def build_pairs(
    rows: Iterable[tuple[int, RawRow]],
    *,
    source: str,
    cfg: DataConfig,
    pair_mode: str,
    require_categories: bool = True,
    quarantine_path: str | Path | None = None,
    max_rows: int | None = None,
) -> tuple[list[dict[str, Any]], LoadReport]:
    """Validate and pair ``rows``. See the module docstring for strict/lenient behaviour."""
    category_index = {name: i for i, name in enumerate(cfg.categories)}
    report = LoadReport(source=source)
    pairs: list[dict[str, Any]] = []
    qfile = None
    short = Path(source).name if not source.startswith("hub:") else source
    try:
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
                if qfile is None:
                    if quarantine_path is None:
                        raise BadRowError(
                            source, row_number, problem.field, problem.reason + " (lenient mode needs a quarantine path)"
                        ) from None
                    Path(quarantine_path).parent.mkdir(parents=True, exist_ok=True)
                    qfile = open(quarantine_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in finally
                    report.quarantine_file = str(quarantine_path)
                report.quarantined[problem.field] += 1
                raw_text = raw.text if isinstance(raw, UnparsableRow) else json.dumps(raw, default=str)[:2000]
                qfile.write(
                    json.dumps(
                        {"source": source, "row": row_number, "field": problem.field, "reason": problem.reason, "raw": raw_text}
                    )
                    + "\n"
                )
                continue
            pair, outcome = construct_pair(
                norm, pair_mode, pair_id=f"{short}:{row_number}", num_categories=len(cfg.categories)
            )
            report.outcomes[outcome] += 1
            if pair is not None:
                pairs.append(pair)
    finally:
        if qfile is not None:
            qfile.close()
    return pairs, report


def load_split(
    cfg: DataConfig,
    split: str,
    *,
    pair_mode: str,
    require_categories: bool = True,
    quarantine_path: str | Path | None = None,
) -> tuple[list[dict[str, Any]], LoadReport]:
    """Read, validate and pair one split of the configured source."""
    source, rows = split_source(cfg, split)
    max_rows = cfg.max_train_rows if split == "train" else cfg.max_test_rows
    return build_pairs(
        rows,
        source=source,
        cfg=cfg,
        pair_mode=pair_mode,
        require_categories=require_categories,
        quarantine_path=quarantine_path,
        max_rows=max_rows,
    )


def format_category_table(pairs: list[dict[str, Any]], categories: list[str]) -> str:
    """A printable per-category table of pair and safety-gap pair counts."""
    summary = pair_summary(pairs, categories)
    width = max(len(c) for c in categories)
    lines = [f"{'category':<{width}}  pairs  safety_gap", "-" * (width + 19)]
    for name in sorted(categories, key=lambda c: -summary[c]["pairs"]):
        s = summary[name]
        lines.append(f"{name:<{width}}  {s['pairs']:5d}  {s['safety_gap_pairs']:10d}")
    return "\n".join(lines)
