"""Validation, pair construction and sources on a hand-made PKU-schema fixture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from catdpo_ray.config import PKU_CATEGORIES, DataConfig
from catdpo_ray.data.loader import build_pairs, load_split
from catdpo_ray.data.schema import BadRowError
from catdpo_ray.data.sources import read_file


def cats(*names: str) -> dict[str, bool]:
    return {c: c in names for c in PKU_CATEGORIES}


def row(prompt: str, safe0: bool, safe1: bool, better: int, safer: int, c0: tuple[str, ...] = (), c1: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "response_0": f"{prompt} answer zero",
        "response_1": f"{prompt} answer one",
        "is_response_0_safe": safe0,
        "is_response_1_safe": safe1,
        "better_response_id": better,
        "safer_response_id": safer,
        "response_0_harm_category": cats(*c0),
        "response_1_harm_category": cats(*c1),
        "response_0_severity_level": 0 if safe0 else 2,
        "response_1_severity_level": 0 if safe1 else 2,
    }


#: The fixture, one row per case (h = unsafe). Expected outcome per mode is tabled below.
ROWS = [
    row("p1", True, False, 0, 0, (), ("Drugs",)),              # better safe, other unsafe
    row("p2", True, False, 1, 0, (), ("Violence", "Drugs")),   # better UNSAFE, other safe
    row("p3", False, False, 0, 1, ("Cybercrime",), ("Cybercrime",)),  # both unsafe
    row("p4", True, True, 1, 0),                                # both safe
]

#: mode -> per row: (chosen response index | None, outcome)
EXPECTED = {
    "helpful": [(0, "kept"), (1, "kept"), (0, "kept"), (1, "kept")],
    "harmless": [(0, "kept"), (0, "kept"), (1, "kept"), (0, "kept")],
    "safe_better": [(0, "kept"), (None, "dropped:chosen_unsafe"), (None, "dropped:chosen_unsafe"), (1, "kept")],
    "safety_aware": [(0, "kept"), (0, "swapped"), (None, "dropped:both_unsafe"), (1, "kept")],
}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_pair_modes_match_hand_table(tmp_path: Path, mode: str) -> None:
    src = write_jsonl(tmp_path / "pku.jsonl", ROWS)
    cfg = DataConfig(train=str(src), validation="strict")
    pairs, report = load_split(cfg, "train", pair_mode=mode)
    expected = EXPECTED[mode]
    kept = [(i, e) for i, e in enumerate(expected) if e[0] is not None]
    assert len(pairs) == len(kept)
    for pair, (i, (chosen, _)) in zip(pairs, kept):
        r = ROWS[i]
        assert pair["pair_id"] == f"pku.jsonl:{i + 1}"
        assert pair["chosen"] == r[f"response_{chosen}"]
        assert pair["rejected"] == r[f"response_{1 - chosen}"]
        assert pair["chosen_safe"] == r[f"is_response_{chosen}_safe"]
        assert pair["safety_gap"] == int(pair["chosen_safe"] and not pair["rejected_safe"])
    outcomes: dict[str, int] = {}
    for _, outcome in expected:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert dict(report.outcomes) == outcomes
    assert report.rows == 4 and report.num_quarantined == 0


def test_safety_gap_and_category_union(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "pku.jsonl", ROWS)
    pairs, _ = load_split(DataConfig(train=str(src)), "train", pair_mode="safety_aware", quarantine_path=tmp_path / "q.jsonl")
    by_prompt = {p["prompt"]: p for p in pairs}
    idx = {c: i for i, c in enumerate(PKU_CATEGORIES)}
    assert by_prompt["p1"]["safety_gap"] == 1
    assert by_prompt["p2"]["safety_gap"] == 1  # swapped: safe response chosen
    assert by_prompt["p4"]["safety_gap"] == 0
    hot = by_prompt["p2"]["categories"]
    assert [i for i, v in enumerate(hot) if v] == sorted([idx["Violence"], idx["Drugs"]])
    assert sum(by_prompt["p4"]["categories"]) == 0


def _good() -> dict[str, Any]:
    return row("fine prompt", True, False, 0, 0, (), ("Drugs",))


def _with(**changes: Any) -> dict[str, Any]:
    r = _good()
    for k, v in changes.items():
        if v is _DELETE:
            del r[k]
        else:
            r[k] = v
    return r


_DELETE = object()

#: bad-row kind -> (row or raw line, field named in the error, words in the reason)
BAD_ROWS: dict[str, tuple[Any, str, str]] = {
    "unparsable line": ('{"prompt": "oops", ', "<line>", "unparsable JSON"),
    "missing field": (_with(response_1=_DELETE), "response_1", "missing"),
    "wrong type": (_with(is_response_0_safe="yes"), "is_response_0_safe", "true/false"),
    "unknown category": (_with(response_1_harm_category={"Drugs": True, "Jaywalking": True}), "response_1_harm_category", "unknown category name 'Jaywalking'"),
    "id not in 0/1": (_with(better_response_id=2), "better_response_id", "must be 0 or 1"),
    "empty prompt": (_with(prompt="   "), "prompt", "empty"),
    "empty response": (_with(response_0=""), "response_0", "empty"),
    "identical responses": (_with(response_1="fine prompt answer zero"), "response_1", "identical"),
}


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_row_strict_names_file_row_field(tmp_path: Path, kind: str) -> None:
    bad, field, words = BAD_ROWS[kind]
    src = write_jsonl(tmp_path / "bad.jsonl", [_good(), _good() | {"prompt": "second"}, bad])
    with pytest.raises(BadRowError) as info:
        load_split(DataConfig(train=str(src), validation="strict"), "train", pair_mode="safety_aware")
    msg = str(info.value)
    assert "bad.jsonl" in msg and "row 3" in msg and repr(field) in msg and words in msg
    assert info.value.row == 3 and info.value.field == field


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_row_lenient_quarantines_with_count(tmp_path: Path, kind: str) -> None:
    bad, field, words = BAD_ROWS[kind]
    src = write_jsonl(tmp_path / "bad.jsonl", [_good(), bad, _good() | {"prompt": "third"}])
    q = tmp_path / "run" / "quarantine.jsonl"
    pairs, report = load_split(DataConfig(train=str(src)), "train", pair_mode="safety_aware", quarantine_path=q)
    assert len(pairs) == 2
    assert report.num_quarantined == 1 and report.quarantined[field] == 1
    assert "QUARANTINED=1" in report.describe()
    entries = [json.loads(line) for line in q.read_text().splitlines()]
    assert len(entries) == 1
    assert entries[0]["row"] == 2 and entries[0]["field"] == field and words in entries[0]["reason"]
    # every row is accounted for: pairs + dropped + quarantined == rows
    assert sum(report.outcomes.values()) + report.num_quarantined == report.rows == 3


def test_column_mapped_source_with_custom_categories(tmp_path: Path) -> None:
    """A non-PKU corpus: other column names, harm categories as lists, a 5-category taxonomy."""
    five = ["fraud", "weapons", "self_harm", "hate", "privacy"]
    rows = [
        {"question": "q1", "a": "x one", "b": "y one", "a_ok": True, "b_ok": False, "pref": 1, "safe_pick": 0,
         "a_tags": [], "b_tags": ["fraud", "privacy"]},
        {"question": "q2", "a": "x two", "b": "y two", "a_ok": True, "b_ok": True, "pref": 0, "safe_pick": 0,
         "a_tags": [], "b_tags": []},
        {"question": "q3", "a": "x three", "b": "y three", "a_ok": True, "b_ok": False, "pref": 0, "safe_pick": 0,
         "a_tags": [], "b_tags": ["bioweapons"]},
    ]
    src = write_jsonl(tmp_path / "custom.jsonl", rows)
    mapping = {"prompt": "question", "response_0": "a", "response_1": "b", "is_response_0_safe": "a_ok",
               "is_response_1_safe": "b_ok", "better_response_id": "pref", "safer_response_id": "safe_pick",
               "response_0_harm_category": "a_tags", "response_1_harm_category": "b_tags"}
    cfg = DataConfig(train=str(src), column_map=mapping, categories=five)
    pairs, report = load_split(cfg, "train", pair_mode="safety_aware", quarantine_path=tmp_path / "q.jsonl")
    assert report.outcomes == {"swapped": 1, "kept": 1}
    assert report.quarantined == {"response_1_harm_category": 1}  # 'bioweapons' is not in the taxonomy
    first = pairs[0]
    assert first["chosen"] == "x one" and first["safety_gap"] == 1
    assert first["categories"] == [1, 0, 0, 0, 1]


def test_parquet_source_matches_jsonl(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_jsonl(tmp_path / "d.jsonl", ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    a, _ = load_split(DataConfig(train=str(jsonl)), "train", pair_mode="safety_aware")
    b, _ = load_split(DataConfig(train=str(tmp_path / "d.parquet")), "train", pair_mode="safety_aware")
    strip = [{k: v for k, v in p.items() if k != "pair_id"} for p in a]
    assert strip == [{k: v for k, v in p.items() if k != "pair_id"} for p in b]


def test_unsupported_suffix_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported data file type '.csv'"):
        list(read_file(tmp_path / "x.csv"))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        list(read_file(tmp_path / "nope.jsonl"))


def test_hub_source_is_only_touched_when_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network unless the config names a hub dataset: with hub_name unset, datasets is never called."""
    import datasets

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("load_dataset called without data.hub_name")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    pairs, _ = build_pairs(iter([]), source="x", cfg=DataConfig(), pair_mode="safety_aware")
    assert pairs == []
    _, rep = load_split(DataConfig(max_train_rows=5), "train", pair_mode="safety_aware", quarantine_path=None)
    assert rep.rows == 5


def test_hub_source_reads_through_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    """With hub_name set, rows come from datasets.load_dataset(name, config, split=, revision=)."""
    import datasets

    calls: list[tuple[Any, ...]] = []

    def fake_load(name: str, config: str, *, split: str, revision: str | None) -> datasets.Dataset:
        calls.append((name, config, split, revision))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = DataConfig(hub_name="PKU-Alignment/PKU-SafeRLHF", hub_config="alpaca-7b", hub_revision="abc")
    pairs, rep = load_split(cfg, "test", pair_mode="safety_aware")
    assert calls == [("PKU-Alignment/PKU-SafeRLHF", "alpaca-7b", "test", "abc")]
    assert len(pairs) == 3 and rep.source.startswith("hub:PKU-Alignment/PKU-SafeRLHF")


def test_bundled_corpus_loads_clean_and_is_imbalanced(capsys: pytest.CaptureFixture[str]) -> None:
    from catdpo_ray.data.loader import format_category_table
    from catdpo_ray.data.pairs import pair_summary

    cfg = DataConfig(validation="strict")
    for split in ("train", "test"):
        pairs, report = load_split(cfg, split, pair_mode="safety_aware")
        assert report.num_quarantined == 0 and report.rows > 0
    pairs, report = load_split(cfg, "train", pair_mode="safety_aware")
    table = format_category_table(pairs, list(PKU_CATEGORIES))
    print(table)
    counts = [v["pairs"] for v in pair_summary(pairs, list(PKU_CATEGORIES)).values()]
    assert min(counts) > 0, "every category must be present"
    assert max(counts) / min(counts) > 10, table
    assert "Drugs" in capsys.readouterr().out
