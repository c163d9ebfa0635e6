"""The generated Markdown reference of every config key (``catdpo-ray config --reference``,
``docs/CONFIG.md``): type, default, valid range and the ``#:`` comment written above the field."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal, get_args, get_origin, get_type_hints

from catdpo_ray.config import RunConfig
from catdpo_ray.config_ranges import RANGES


def _field_docs(cls: Any) -> dict[str, str]:
    """``#:`` comment lines written above each field of a config dataclass."""
    import inspect

    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        text = line.strip()
        if text.startswith("#:"):
            pending.append(text[2:].strip())
            continue
        m = re.match(r"^(\w+):", text)
        if m and pending:
            docs[m.group(1)] = " ".join(pending)
        if not text.startswith("#"):
            pending = []
    return docs


def _short_type(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " / ".join(f"`{a}`" for a in get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "").replace(" | ", " or ")


def config_reference() -> str:
    """A Markdown reference of every key: type, default and meaning (``catdpo-ray config --reference``)."""
    lines = ["| key | type | default | valid | meaning |", "|---|---|---|---|---|"]

    def walk(cls: Any, prefix: str) -> None:
        hints = get_type_hints(cls)
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, prefix + f.name + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            meaning = docs.get(f.name, "").replace("|", "/")
            bound = RANGES.get(prefix + f.name)
            valid = ""
            if bound is not None:
                valid = bound.describe() + (" or null" if type(None) in get_args(tp) else "")
                valid += f" ({bound.why})" if bound.why else ""
            lines.append(f"| `{prefix}{f.name}` | {_short_type(tp)} | `{default!r}` | {valid} | {meaning} |")

    walk(RunConfig, "")
    return "\n".join(lines)
