"""The quarantine file of lenient validation: one JSON object per bad row, per (source, split).

Each entry is ``{"source", "split", "row", "field", "reason", "raw"}``. A run's train and test
splits share one ``quarantine.jsonl``; loading a split *replaces* that split's entries, so a
rerun or a resume never appends the same rows again and the file's line count equals the sum of
the load reports' quarantine counts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_quarantine(path: str | Path, source: str, split: str | None, entries: list[dict[str, Any]]) -> int:
    """Replace the ``(source, split)`` entries of the quarantine file with ``entries``.

    Entries of other sources/splits are kept (train and test share one file per run); a torn
    line left by a crashed run is dropped. Written to a temporary file and renamed, so a crash
    never leaves half a file; the file is removed when nothing remains in it.

    Returns:
        The number of lines in the file afterwards.
    """
    path = Path(path)
    lines: list[str] = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                old = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not (isinstance(old, dict) and old.get("source") == source and old.get("split") == split):
                lines.append(line)
    lines += [json.dumps(e) for e in entries]
    if not lines:
        path.unlink(missing_ok=True)
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)
    return len(lines)
