"""Row validation: the PKU-SafeRLHF schema in, a normalised record out, or a named problem.

A *raw row* is one source record (a JSONL line, a Parquet row, a hub example). After the
column mapping it must look like PKU-SafeRLHF (METHOD.md section 1). :func:`normalize_row`
checks it field by field and returns a *normalised row*; any problem raises
:class:`RowProblem` naming the field and what was wrong. The caller adds the file and row
number (:class:`BadRowError`) or quarantines the row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Fields every row must have (the harm-category dicts only when the loss needs categories).
REQUIRED_FIELDS: tuple[str, ...] = (
    "prompt",
    "response_0",
    "response_1",
    "is_response_0_safe",
    "is_response_1_safe",
    "better_response_id",
    "safer_response_id",
)
CATEGORY_FIELDS: tuple[str, ...] = ("response_0_harm_category", "response_1_harm_category")
#: Informational fields: checked for type when present, never required.
OPTIONAL_INT_FIELDS: tuple[str, ...] = ("response_0_severity_level", "response_1_severity_level")


class RowProblem(ValueError):
    """One field of one row is wrong."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"field {field!r}: {reason}")
        self.field = field
        self.reason = reason


class BadRowError(ValueError):
    """A bad row in strict mode: names the source, the row number, the field and the problem."""

    def __init__(self, source: str, row: int, field: str, reason: str) -> None:
        super().__init__(f"{source}, row {row}: field {field!r}: {reason}")
        self.source = source
        self.row = row
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class NormalizedRow:
    """A validated source row. ``categories_*`` are index sets into the run's category list."""

    prompt: str
    responses: tuple[str, str]
    safe: tuple[bool, bool]
    better: int
    safer: int
    categories: tuple[frozenset[int], frozenset[int]]


def apply_column_map(raw: Mapping[str, Any], column_map: Mapping[str, str]) -> dict[str, Any]:
    """Rename source columns to PKU field names (``column_map``: PKU field -> source column)."""
    if not column_map:
        return dict(raw)
    out = dict(raw)
    for pku_field, source_col in column_map.items():
        if source_col in raw:
            out[pku_field] = raw[source_col]
    return out


def _text(row: Mapping[str, Any], name: str) -> str:
    value = row[name]
    if not isinstance(value, str):
        raise RowProblem(name, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise RowProblem(name, "is empty")
    return value


def _flag(row: Mapping[str, Any], name: str) -> bool:
    value = row[name]
    if not isinstance(value, bool):
        raise RowProblem(name, f"expected true/false, got {type(value).__name__} {value!r}")
    return value


def _response_id(row: Mapping[str, Any], name: str) -> int:
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise RowProblem(name, f"expected the integer 0 or 1, got {type(value).__name__} {value!r}")
    if value not in (0, 1):
        raise RowProblem(name, f"must be 0 or 1, got {value}")
    return value


def _category_set(row: Mapping[str, Any], name: str, index: Mapping[str, int]) -> frozenset[int]:
    """A PKU dict {name: bool} or a list of names -> set of category indices."""
    value = row.get(name)
    if value is None:
        raise RowProblem(name, "is missing")
    if isinstance(value, Mapping):
        names = []
        for key, flag in value.items():
            if not isinstance(flag, bool):
                raise RowProblem(name, f"category {key!r} must map to true/false, got {flag!r}")
            if key not in index:
                raise RowProblem(name, f"unknown category name {key!r}; the run's categories are {sorted(index)}")
            if flag:
                names.append(key)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        names = list(value)
        for key in names:
            if key not in index:
                raise RowProblem(name, f"unknown category name {key!r}; the run's categories are {sorted(index)}")
    else:
        raise RowProblem(name, f"expected a dict of category -> bool or a list of names, got {type(value).__name__}")
    return frozenset(index[n] for n in names)


def normalize_row(
    raw: Mapping[str, Any],
    *,
    category_index: Mapping[str, int],
    require_categories: bool = True,
) -> NormalizedRow:
    """Validate one (column-mapped) row; raise :class:`RowProblem` on the first problem.

    Bad means: missing field, wrong type, unknown category name, a response id not in {0, 1},
    an empty prompt or response, or two identical responses.
    """
    for name in REQUIRED_FIELDS:
        if name not in raw or raw[name] is None:
            raise RowProblem(name, "is missing")
    prompt = _text(raw, "prompt")
    responses = (_text(raw, "response_0"), _text(raw, "response_1"))
    if responses[0].strip() == responses[1].strip():
        raise RowProblem("response_1", "is identical to response_0")
    safe = (_flag(raw, "is_response_0_safe"), _flag(raw, "is_response_1_safe"))
    better = _response_id(raw, "better_response_id")
    safer = _response_id(raw, "safer_response_id")
    for name in OPTIONAL_INT_FIELDS:
        value = raw.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise RowProblem(name, f"expected an integer severity, got {type(value).__name__} {value!r}")
    if require_categories:
        cats = (_category_set(raw, CATEGORY_FIELDS[0], category_index), _category_set(raw, CATEGORY_FIELDS[1], category_index))
    else:
        present = [raw.get(f) is not None for f in CATEGORY_FIELDS]
        cats = tuple(  # type: ignore[assignment]
            _category_set(raw, f, category_index) if has else frozenset() for f, has in zip(CATEGORY_FIELDS, present)
        )
    return NormalizedRow(prompt=prompt, responses=responses, safe=safe, better=better, safer=safer, categories=cats)
