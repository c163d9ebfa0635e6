"""Data faults of issue 11 (item 9): duplicates, BOM, compressed and misnamed files, decode errors
that name the file and line, a quarantine file that a rerun rewrites instead of doubling, empty and
all-bad splits refused before any Ray work, and the count of pairs dropped each epoch.

Every test asserts an exact count or message, on real files written to ``tmp_path``.
"""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest

from catdpo_ray.config import DataConfig
from catdpo_ray.data.loader import (
    EmptySplitError,
    build_pairs,
    describe_dropped,
    dropped_per_epoch,
    load_split,
)
from catdpo_ray.data.schema import BadRowError
from catdpo_ray.data.sources import DataFileError, read_file
from tests.data.test_loader import ROWS, row, write_jsonl


def _jsonl_bytes(rows: list[Any]) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode("utf-8")


def _load(path: Path, q: Path | None = None, **data: Any) -> tuple[list[dict[str, Any]], Any]:
    return load_split(DataConfig(train=str(path), **data), "train", pair_mode="safety_aware", quarantine_path=q)


# ---------------------------------------------------------------------------------------------
# exact duplicates


A, B, C = row("a", True, False, 0, 0, (), ("Drugs",)), row("b", True, True, 1, 0), row("c", True, False, 0, 0)


def test_duplicates_are_dropped_and_counted_by_default(tmp_path: Path) -> None:
    reordered = dict(reversed(list(A.items())))  # same content, other key order: still a duplicate
    near = A | {"response_1_severity_level": 3}  # one field differs: not a duplicate
    src = write_jsonl(tmp_path / "d.jsonl", [A, B, A, reordered, C, near])
    pairs, rep = _load(src, tmp_path / "q.jsonl")
    assert rep.duplicates == 2 and rep.outcomes["dropped:duplicate"] == 2
    assert [p["pair_id"] for p in pairs] == ["d.jsonl:1", "d.jsonl:2", "d.jsonl:5", "d.jsonl:6"]
    assert rep.rows == 6 and sum(rep.outcomes.values()) == 6
    assert "dropped:duplicate=2" in rep.describe()
    assert rep.to_dict()["duplicates"] == 2 and rep.to_dict()["duplicate_policy"] == "drop"


def test_duplicates_kept_on_request_are_still_counted(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "d.jsonl", [A, B, A, A, C])
    pairs, rep = _load(src, tmp_path / "q.jsonl", duplicates="keep")
    assert len(pairs) == 5 and rep.duplicates == 2 and "dropped:duplicate" not in rep.outcomes
    assert rep.describe() == (f"{src}: 5 rows -> 5 pairs, kept=5, duplicates=2 (kept: data.duplicates=keep)")


def test_repeated_bad_rows_are_each_quarantined_not_deduplicated(tmp_path: Path) -> None:
    bad = A | {"better_response_id": 7}
    src = write_jsonl(tmp_path / "d.jsonl", [A, bad, bad, B])
    pairs, rep = _load(src, tmp_path / "q.jsonl")
    assert len(pairs) == 2 and rep.duplicates == 0 and rep.quarantined == {"better_response_id": 2}


def test_duplicates_is_a_documented_config_key() -> None:
    from catdpo_ray.config import ConfigError, load_config
    from catdpo_ray.config_docs import config_reference

    assert load_config(None, ["data.duplicates=keep"]).data.duplicates == "keep"
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.duplicates=merge"])
    assert str(info.value) == "data.duplicates: 'merge' is not valid; choose one of ['keep', 'drop']"
    assert "| `data.duplicates` | `keep` / `drop` | `'drop'` |" in config_reference()


# ---------------------------------------------------------------------------------------------
# byte-order mark, gzip, misnamed and foreign files, decode errors


def test_utf8_bom_is_skipped_in_strict_mode(tmp_path: Path) -> None:
    """An editor's BOM used to make row 1 unparsable: strict refused the file, lenient lost the row."""
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + _jsonl_bytes(ROWS))
    pairs, rep = _load(jsonl, validation="strict")
    assert rep.rows == 4 and len(pairs) == 3 and rep.num_quarantined == 0
    array = tmp_path / "bom.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS).encode())
    pairs2, _ = _load(array, validation="strict")
    assert [p["chosen"] for p in pairs2] == [p["chosen"] for p in pairs]


@pytest.mark.parametrize("name", ["d.jsonl.gz", "d.JSONL.GZ", "d.jsonl", "d.json.gz", "d.json"])
def test_gzip_is_read_by_suffix_or_by_magic_bytes(tmp_path: Path, name: str) -> None:
    """``.jsonl.gz``/``.json.gz`` are read through gzip, and so is a gzip stream named ``.jsonl``."""
    plain, _ = _load(write_jsonl(tmp_path / "plain.jsonl", ROWS))
    body = json.dumps(ROWS).encode() if ".json." in name.lower() or name.endswith(".json") else _jsonl_bytes(ROWS)
    path = tmp_path / name
    path.write_bytes(gzip.compress(body))
    pairs, rep = _load(path, validation="strict")
    assert rep.rows == 4
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(p["chosen"], p["rejected"]) for p in plain]


def test_gzip_with_bom_inside(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress(b"\xef\xbb\xbf" + _jsonl_bytes(ROWS)))
    assert len(_load(path, validation="strict")[0]) == 3


def _zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("d.jsonl", "{}")


@pytest.mark.parametrize(
    ("name", "write", "message"),
    [
        ("d.jsonl.gz", lambda p: p.write_bytes(_jsonl_bytes(ROWS)),
         "{p}: named .gz but not gzip-compressed; rename it to 'd.jsonl'"),
        ("d.jsonl", _zip, "{p}: this is a zip archive, not .jsonl text"),
        ("d.jsonl", lambda p: p.write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 16), "{p}: this is a zstd-compressed file, not .jsonl text"),
        ("d.jsonl", lambda p: p.write_bytes(b"BZh91AY&SY"), "{p}: this is a bzip2-compressed file, not .jsonl text"),
        ("d.json", lambda p: p.write_bytes(b"PAR1" + b"\0" * 16), "{p}: this is a Parquet file (name it .parquet), not .json text"),
        ("d.jsonl", lambda p: p.write_bytes(json.dumps(ROWS[0]).encode("utf-16")),
         "{p}: this is UTF-16 text (byte-order mark FF FE); save it as UTF-8, not .jsonl text"),
        ("d.csv.gz", lambda p: p.write_bytes(gzip.compress(b"a,b\n")),
         "{p}: unsupported data file type '.csv.gz'; use one of ['.json', '.json.gz', '.jsonl', '.jsonl.gz', '.parquet']"),
        ("d.parquet", lambda p: p.write_bytes(gzip.compress(b"x")), "{p}: a gzip stream named .parquet; decompress it first"),
    ],
)
def test_foreign_or_misnamed_files_are_refused_naming_the_file(tmp_path: Path, name: str, write: Any, message: str) -> None:
    path = tmp_path / name
    write(path)
    with pytest.raises(DataFileError) as info:
        list(read_file(path))
    assert str(info.value) == message.format(p=path)


def test_truncated_gzip_names_file_and_last_good_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl.gz"
    whole = gzip.compress(_jsonl_bytes([A, B, C] * 200))
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataFileError) as info:
        _load(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: damaged gzip stream (EOFError: ") and " after line " in msg


def test_non_utf8_line_names_file_and_line(tmp_path: Path) -> None:
    """A Latin-1 byte on line 2: strict names file, row 2 and the reason; lenient quarantines that row only."""
    path = tmp_path / "latin.jsonl"
    lines = _jsonl_bytes([A]) + json.dumps(B).replace("b answer", "b \xe9").encode("latin-1") + b"\n" + _jsonl_bytes([C])
    path.write_bytes(lines)
    with pytest.raises(BadRowError) as info:
        _load(path, validation="strict")
    assert str(info.value) == (f"{path}, row 2: field '<line>': not valid UTF-8: invalid continuation byte "
                               f"at byte {json.dumps(B).index('b answer') + 2} of the line")
    pairs, rep = _load(path, tmp_path / "q.jsonl")
    assert len(pairs) == 2 and rep.quarantined == {"<line>": 1}


def test_json_array_errors_name_file_and_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"prompt": "x"},\n  {"prompt": \n]\n')
    with pytest.raises(DataFileError) as info:
        _load(broken)
    assert str(info.value) == f"{broken}, line 4: not valid JSON: Expecting value at column 1"
    lines_named_json = tmp_path / "rows.json"
    lines_named_json.write_bytes(_jsonl_bytes(ROWS))
    with pytest.raises(DataFileError) as info:
        _load(lines_named_json)
    assert str(info.value) == (f"{lines_named_json}, line 2: not valid JSON: Extra data at column 1 "
                               "(one object per line is JSON Lines: name the file .jsonl)")
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'[\n{"prompt": "caf\xe9"}]')
    with pytest.raises(DataFileError) as info:
        _load(latin)
    assert str(info.value) == f"{latin}, line 2: not valid UTF-8 (invalid continuation byte)"


def test_damaged_parquet_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1 this is not a parquet body")
    with pytest.raises(DataFileError) as info:
        _load(path)
    assert str(info.value).startswith(f"{path}: not a readable Parquet file: ")


# ---------------------------------------------------------------------------------------------
# quarantine.jsonl: rewritten per (source, split), never appended across runs


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rerun_rewrites_quarantine_instead_of_appending(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [A, "{oops", B, A | {"prompt": ""}])
    test = write_jsonl(tmp_path / "test.jsonl", [C, "[1, 2]"])
    q = tmp_path / "run" / "quarantine.jsonl"
    cfg = DataConfig(train=str(train), test=str(test))
    for _ in range(3):  # first run, rerun, resume: the file never grows
        _, tr = load_split(cfg, "train", pair_mode="safety_aware", quarantine_path=q)
        _, te = load_split(cfg, "test", pair_mode="safety_aware", quarantine_path=q)
        entries = _lines(q)
        assert len(entries) == tr.num_quarantined + te.num_quarantined == 3
        assert [(e["split"], e["row"]) for e in entries] == [("train", 2), ("train", 4), ("test", 2)]
    assert not q.with_name("quarantine.jsonl.tmp").exists()


def test_fixed_file_clears_its_old_quarantine_entries(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "train.jsonl", [A, "{oops", B])
    q = tmp_path / "quarantine.jsonl"
    _, rep = _load(src, q)
    assert rep.quarantine_file == str(q) and len(_lines(q)) == 1
    q.write_text(q.read_text() + '{"source": "torn')  # a crashed run's torn last line
    write_jsonl(src, [A, B])
    _, rep = _load(src, q)
    assert rep.num_quarantined == 0 and rep.quarantine_file is None and not q.exists()


# ---------------------------------------------------------------------------------------------
# empty and all-bad splits: refused by load_split, before tokenization and Ray


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xef\xbb\xbf", gzip.compress(b"")])
def test_empty_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(EmptySplitError) as info:
        _load(path, tmp_path / "q.jsonl")
    assert str(info.value) == f"data.train {path}: no data rows (the train split is empty); nothing to train on"


def test_empty_test_split_says_evaluate(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [])
    with pytest.raises(EmptySplitError) as info:
        load_split(DataConfig(test=str(path)), "test", pair_mode="safety_aware")
    assert str(info.value) == f"data.test {path}: no data rows (the test split is empty); nothing to evaluate on"


def test_all_bad_file_is_refused_with_counts(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", ["{oops", A | {"prompt": ""}, "not json", A | {"better_response_id": 3}])
    q = tmp_path / "q.jsonl"
    with pytest.raises(EmptySplitError) as info:
        _load(path, q)
    assert str(info.value) == (f"data.train {path}: all 4 rows are bad "
                               f"({{'<line>': 2, 'better_response_id': 1, 'prompt': 1}}); see {q}")
    assert len(_lines(q)) == 4  # the reasons are on disk for the user to read


def test_all_rows_dropped_by_the_pair_rule_is_refused(tmp_path: Path) -> None:
    both_unsafe = [row(f"p{i}", False, False, 0, 0, ("Drugs",), ("Drugs",)) for i in range(3)]
    path = write_jsonl(tmp_path / "unsafe.jsonl", [*both_unsafe, "{oops"])
    with pytest.raises(EmptySplitError) as info:
        _load(path, tmp_path / "q.jsonl")
    assert str(info.value) == (f"data.train {path}: 4 rows gave 0 pairs under pair mode 'safety_aware' "
                               "(dropped:both_unsafe=3, quarantined=1)")


def test_build_pairs_itself_still_returns_empty() -> None:
    """The refusal belongs to load_split (a split); build_pairs over no rows is an empty result."""
    pairs, rep = build_pairs(iter([]), source="x", cfg=DataConfig(), pair_mode="safety_aware")
    assert pairs == [] and rep.rows == 0


# ---------------------------------------------------------------------------------------------
# pairs that do not fill the last global batch of an epoch


@pytest.mark.parametrize(("num_pairs", "global_batch", "dropped"), [(100, 24, 4), (96, 24, 0), (5, 8, 5), (0, 8, 0), (7, 1, 0)])
def test_dropped_per_epoch_by_hand(num_pairs: int, global_batch: int, dropped: int) -> None:
    assert dropped_per_epoch(num_pairs, global_batch) == dropped


def test_dropped_per_epoch_matches_the_driver_step_plan() -> None:
    """Parity with plan_steps: steps/epoch x global batch + dropped = all pairs."""
    from catdpo_ray.config import load_config
    from catdpo_ray.train.driver import plan_steps

    cfg = load_config(None, ["train.micro_batch_size=4", "train.grad_accum=2", "scaling.num_workers=3"])
    for n in (24, 25, 47, 48, 100, 1001):
        steps, _ = plan_steps(cfg, n)
        assert steps * cfg.global_batch_size + dropped_per_epoch(n, cfg.global_batch_size) == n


def test_describe_dropped_and_bad_arguments() -> None:
    assert describe_dropped(100, 24) == ("4 of 100 training pairs do not fill a global batch of 24 "
                                         "and are left out of each epoch (4 steps/epoch)")
    assert describe_dropped(96, 24) is None
    with pytest.raises(ValueError, match=r"^global_batch must be >= 1, got 0$"):
        dropped_per_epoch(10, 0)
    with pytest.raises(ValueError, match=r"^num_pairs must be >= 0, got -1$"):
        dropped_per_epoch(-1, 8)
