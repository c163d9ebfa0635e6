"""Sources of raw rows: local JSONL / JSON / Parquet files, the bundled sample, HF hub datasets.

Each reader yields ``(row_number, raw)`` where ``row_number`` is 1-based (the line number for
JSONL) and ``raw`` is a dict, or an :class:`UnparsableRow` for a line that is not JSON. No
network is touched unless the config names a hub dataset.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"


@dataclass(frozen=True)
class UnparsableRow:
    """A source line that could not be parsed into an object."""

    text: str
    reason: str


RawRow = dict[str, Any] | UnparsableRow


def bundled_path(split: str) -> Path:
    """Path of the bundled sample corpus split (``train`` or ``test``)."""
    path = SAMPLE_DIR / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"bundled corpus split {split!r} not found at {path}")
    return path


def read_jsonl(path: Path) -> Iterator[tuple[int, RawRow]]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield lineno, UnparsableRow(line[:500], f"unparsable JSON: {exc.msg} at column {exc.colno}")
                continue
            if not isinstance(obj, dict):
                yield lineno, UnparsableRow(line[:500], f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield lineno, obj


def read_json_array(path: Path) -> Iterator[tuple[int, RawRow]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: a .json data file must hold a list of row objects")
    for i, obj in enumerate(data, start=1):
        yield i, obj if isinstance(obj, dict) else UnparsableRow(repr(obj)[:500], "expected an object")


def read_parquet(path: Path) -> Iterator[tuple[int, RawRow]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    yield from enumerate(table.to_pylist(), start=1)


READERS = {".jsonl": read_jsonl, ".json": read_json_array, ".parquet": read_parquet}


def read_file(path: str | Path) -> Iterator[tuple[int, RawRow]]:
    """Rows of a local data file, dispatched on its suffix."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data file not found: {p}")
    try:
        reader = READERS[p.suffix.lower()]
    except KeyError:
        raise ValueError(f"{p}: unsupported data file type {p.suffix!r}; use one of {sorted(READERS)}") from None
    return reader(p)


def read_hub(name: str, *, config: str | None, split: str, revision: str | None) -> Iterator[tuple[int, RawRow]]:
    """Rows of a HF hub dataset through ``datasets.load_dataset`` (needs hub access)."""
    import datasets

    ds = datasets.load_dataset(name, config, split=split, revision=revision)
    for i, row in enumerate(ds, start=1):
        yield i, dict(row)


def read_any_dataset(ds: Any) -> Iterator[tuple[int, RawRow]]:
    """Rows of an in-memory ``datasets.Dataset`` (or any iterable of dicts)."""
    for i, row in enumerate(ds, start=1):
        yield i, dict(row)
