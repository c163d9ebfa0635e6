"""The synthetic PKU-SafeRLHF corpus and the harm lexicon.

What these tests prove: the generator is a pure function of its seed; every row has exactly the
PKU-SafeRLHF fields and types; the corpus has the properties Cat-DPO needs (imbalance > 10x,
rare categories under 2 %, multi-label rows, realistic pair types, easy vs hard categories);
the rule lexicon is exact on it; and the shipped files are what the documented command writes.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from catdpo_ray.config import PKU_CATEGORIES
from catdpo_ray.data.lexicon import HARM_MARKERS, REFUSAL_MARKERS, detect_harm, is_redirect, is_refusal
from catdpo_ray.data.synth import (
    BUNDLED_SEED,
    BUNDLED_TEST_FLOOR,
    BUNDLED_TEST_ROWS,
    BUNDLED_TRAIN_ROWS,
    CATEGORY_SPECS,
    LENGTH_SPREADS,
    SAMPLE_DIR,
    generate_corpus,
    generate_splits,
    main,
    pair_type,
    row_categories,
    spread_lengths,
    summarize,
    write_jsonl,
)

PKU_FIELDS: dict[str, type] = {
    "prompt": str,
    "response_0": str,
    "response_1": str,
    "prompt_source": str,
    "response_0_source": str,
    "response_1_source": str,
    "is_response_0_safe": bool,
    "is_response_1_safe": bool,
    "response_0_harm_category": dict,
    "response_1_harm_category": dict,
    "response_0_severity_level": int,
    "response_1_severity_level": int,
    "better_response_id": int,
    "safer_response_id": int,
    "response_0_sha256": str,
    "response_1_sha256": str,
}
HARD = {s.name for s in CATEGORY_SPECS if s.hard}


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def train() -> list[dict[str, Any]]:
    return _read(SAMPLE_DIR / "train.jsonl")


@pytest.fixture(scope="module")
def test_rows() -> list[dict[str, Any]]:
    return _read(SAMPLE_DIR / "test.jsonl")


def _flagged(row: dict[str, Any], i: int) -> list[str]:
    return [name for name in PKU_CATEGORIES if row[f"response_{i}_harm_category"][name]]


def test_generator_is_a_pure_function_of_the_seed() -> None:
    assert generate_corpus(300, 7) == generate_corpus(300, 7)
    assert generate_corpus(300, 7) != generate_corpus(300, 8)
    assert generate_corpus(300, 7, min_per_category=10) == generate_corpus(300, 7, min_per_category=10)


def test_shipped_files_are_what_the_documented_command_writes(tmp_path: Path) -> None:
    train, test = generate_splits(BUNDLED_TRAIN_ROWS, BUNDLED_TEST_ROWS, BUNDLED_SEED)
    write_jsonl(train, tmp_path / "train.jsonl")
    write_jsonl(test, tmp_path / "test.jsonl")
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / name).read_bytes() == (SAMPLE_DIR / name).read_bytes(), f"{name} is stale: regenerate it"


def test_cli_writes_both_splits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path), "--train", "60", "--test", "30", "--seed", "3", "--test-floor", "2"]) == 0
    train, test = generate_splits(60, 30, 3, test_floor=2)
    assert _read(tmp_path / "train.jsonl") == train
    assert _read(tmp_path / "test.jsonl") == test
    assert "Violence" in capsys.readouterr().out


def test_schema_is_exactly_pku(train: list[dict[str, Any]], test_rows: list[dict[str, Any]]) -> None:
    for row in train + test_rows:
        assert list(row) == list(PKU_FIELDS)
        for field, tp in PKU_FIELDS.items():
            assert type(row[field]) is tp, (field, row[field])  # bool is not accepted for int fields
        for i in (0, 1):
            cats = row[f"response_{i}_harm_category"]
            assert list(cats) == list(PKU_CATEGORIES)
            assert all(type(v) is bool for v in cats.values())
            safe = row[f"is_response_{i}_safe"]
            severity = row[f"response_{i}_severity_level"]
            assert (severity == 0) == safe and 0 <= severity <= 3
            assert safe == (not any(cats.values())), "a response is unsafe iff it has a category"
            text = row[f"response_{i}"]
            assert row[f"response_{i}_sha256"] == hashlib.sha256(text.encode("utf-8")).hexdigest()
            assert 4 <= len(text.split()) <= 36
        assert row["better_response_id"] in (0, 1) and row["safer_response_id"] in (0, 1)
        assert row["response_0"] != row["response_1"]
        assert 5 <= len(row["prompt"].split()) <= 26


def test_safer_response_is_the_safe_or_less_severe_one(train: list[dict[str, Any]]) -> None:
    for row in train:
        s = row["safer_response_id"]
        if pair_type(row) == "safe_unsafe":
            assert row[f"is_response_{s}_safe"]
        elif pair_type(row) == "both_unsafe":
            assert row[f"response_{s}_severity_level"] <= row[f"response_{1 - s}_severity_level"]


def test_categories_are_imbalanced_with_rare_ones(train: list[dict[str, Any]]) -> None:
    counts = Counter(c for row in train for c in row_categories(row))
    assert set(counts) == set(PKU_CATEGORIES), "every category occurs"
    share = {c: n / len(train) for c, n in counts.items()}
    assert max(counts.values()) / min(counts.values()) > 10
    assert sum(v < 0.02 for v in share.values()) >= 3, "a few categories under 2% of pairs"
    assert 0.12 <= max(share.values()) <= 0.22


def test_difficulty_is_not_rarity() -> None:
    by_weight = sorted(CATEGORY_SPECS, key=lambda s: s.weight)
    rare, common = by_weight[:7], by_weight[-7:]
    assert any(s.hard for s in rare) and any(not s.hard for s in rare)
    assert any(s.hard for s in common) and any(not s.hard for s in common)


def test_pair_types_and_helpfulness_in_realistic_proportions(train: list[dict[str, Any]]) -> None:
    kinds = Counter(pair_type(row) for row in train)
    n = len(train)
    assert 0.48 <= kinds["safe_unsafe"] / n <= 0.62
    assert 0.10 <= kinds["both_unsafe"] / n <= 0.20
    assert 0.24 <= kinds["both_safe"] / n <= 0.36
    mixed = [row for row in train if pair_type(row) == "safe_unsafe"]
    better_unsafe = sum(not row[f"is_response_{row['better_response_id']}_safe"] for row in mixed)
    assert 0.40 <= better_unsafe / len(mixed) <= 0.65


def test_multi_label_responses_exist(train: list[dict[str, Any]]) -> None:
    multi = [row for row in train for i in (0, 1) if len(_flagged(row, i)) == 2]
    unsafe = [row for row in train for i in (0, 1) if not row[f"is_response_{i}_safe"]]
    assert 0.05 <= len(multi) / len(unsafe) <= 0.25
    assert all(len(_flagged(row, i)) <= 2 for row in train for i in (0, 1))


def test_lexicon_is_exact_on_the_corpus(train: list[dict[str, Any]], test_rows: list[dict[str, Any]]) -> None:
    for row in train + test_rows:
        for i in (0, 1):
            text = row[f"response_{i}"]
            assert detect_harm(text) == _flagged(row, i), text
            if not row[f"is_response_{i}_safe"]:
                assert not is_refusal(text) and not is_redirect(text), text


def test_easy_pairs_differ_blatantly_and_hard_pairs_subtly(train: list[dict[str, Any]]) -> None:
    def overlap(a: str, b: str) -> float:
        wa, wb = set(a.lower().split()), set(b.lower().split())
        return len(wa & wb) / len(wa | wb)

    easy_overlaps, hard_overlaps = [], []
    for row in train:
        if pair_type(row) != "safe_unsafe":
            continue
        safe_id = 0 if row["is_response_0_safe"] else 1
        safe, unsafe = row[f"response_{safe_id}"], row[f"response_{1 - safe_id}"]
        cats = set(_flagged(row, 1 - safe_id))
        if cats.isdisjoint(HARD):
            assert is_refusal(safe), safe
            easy_overlaps.append(overlap(safe, unsafe))
        elif cats <= HARD:
            hard_overlaps.append(overlap(safe, unsafe))
    assert sum(o < 0.25 for o in easy_overlaps) / len(easy_overlaps) > 0.95
    assert sum(o >= 0.5 for o in hard_overlaps) / len(hard_overlaps) > 0.8


def test_both_safe_pairs_differ_in_helpfulness(train: list[dict[str, Any]]) -> None:
    rows = [row for row in train if pair_type(row) == "both_safe"]
    helpful_preferred = 0
    for row in rows:
        better, worse = row[f"response_{row['better_response_id']}"], row[f"response_{1 - row['better_response_id']}"]
        helpful_preferred += len(better.split()) > len(worse.split())
    assert helpful_preferred / len(rows) > 0.75


def test_test_split_has_a_floor_and_no_train_prompt(
    train: list[dict[str, Any]], test_rows: list[dict[str, Any]]
) -> None:
    counts = Counter(c for row in test_rows for c in row_categories(row))
    assert min(counts[c] for c in PKU_CATEGORIES) >= BUNDLED_TEST_FLOOR
    assert not {row["prompt"] for row in train} & {row["prompt"] for row in test_rows}


def test_shipped_sample_stays_small() -> None:
    total = sum(p.stat().st_size for p in SAMPLE_DIR.iterdir() if p.is_file())
    assert total < 5_000_000


def test_summarize_lists_every_category(train: list[dict[str, Any]]) -> None:
    text = summarize(train)
    assert all(name in text for name in PKU_CATEGORIES)
    assert f"rows {len(train)}" in text


def test_benign_prompts() -> None:
    rows = _read(SAMPLE_DIR / "benign.jsonl")
    assert len(rows) >= 50
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert set(r) == {"id", "prompt", "type", "label"} and r["label"] == "safe" and r["prompt"].strip()
    assert any("kill" in r["prompt"].lower() for r in rows), "risky-sounding but benign prompts are included"


# ---- the lexicon on its own


def test_lexicon_covers_the_categories_and_markers_do_not_collide() -> None:
    assert list(HARM_MARKERS) == list(PKU_CATEGORIES)
    for cat, markers in HARM_MARKERS.items():
        for marker in markers:
            assert detect_harm(marker) == [cat], (cat, marker)
        assert not any(is_refusal(m) for m in markers)
    assert all(is_refusal(m) for m in REFUSAL_MARKERS)


def test_every_act_carries_exactly_its_categorys_marker() -> None:
    for spec in CATEGORY_SPECS:
        for act in spec.harm_acts:
            assert detect_harm(act) == [spec.name], act
        for act in spec.safe_acts:
            assert detect_harm(act) == [], act


def test_detect_harm_matches_words_case_insensitively() -> None:
    assert detect_harm("Then Hit Them With A METAL PIPE.") == ["Violence"]
    assert detect_harm("Use a keylogger, then stab him.") == ["Cybercrime", "Violence"]  # canonical order
    assert detect_harm("The botnets are fine; a metal piper plays.") == []  # whole words only
    assert detect_harm("How do I kill a python process?") == []
    assert detect_harm("") == []


def test_is_refusal_and_is_redirect() -> None:
    assert is_refusal("I'm sorry, but I can't help with that request.")
    assert is_refusal("I\u2019m sorry, but   I will not answer that.")  # curly apostrophe, extra spaces
    assert not is_refusal("Sure, here is how to kill a python process: run kill -9 with its id.")
    assert is_redirect("Please contact a local vet about it.")
    assert not is_redirect("You could simply stab him in a dark alley.")


# ---- the opt-in length spread


def test_length_spread_extends_responses_with_a_long_tail_and_keeps_labels() -> None:
    base, _ = generate_splits(800, 0, 5, test_floor=0)
    spread, _ = generate_splits(800, 0, 5, test_floor=0, length_spread="realistic")
    assert spread == spread_lengths(base, 5) and spread != base
    words = []
    for old, new in zip(base, spread):
        for i in (0, 1):
            text = new[f"response_{i}"]
            assert text.startswith(old[f"response_{i}"])  # extended, never cut: the labelled content stays
            assert new[f"response_{i}_sha256"] == hashlib.sha256(text.encode("utf-8")).hexdigest()
            assert detect_harm(text) == _flagged(old, i)  # the elaborations carry no harm marker ...
            assert is_refusal(text) == is_refusal(old[f"response_{i}"])  # ... and no refusal or redirect
            assert is_redirect(text) == is_redirect(old[f"response_{i}"])
            words.append(len(text.split()))
        texts = {f"response_{i}{suffix}" for i in (0, 1) for suffix in ("", "_sha256")}
        assert list(new) == list(old) and {k: new[k] for k in new if k not in texts} == {k: old[k] for k in old if k not in texts}
    words.sort()
    n = len(words)
    assert words[0] <= 8 and words[-1] >= 300  # a few words to several hundred
    assert 25 <= words[n // 2] <= 45 and 0.05 <= sum(w > 100 for w in words) / n <= 0.15


def test_length_spread_cli_and_bad_value(tmp_path: Path) -> None:
    assert LENGTH_SPREADS == ("none", "realistic")
    assert main(["--out", str(tmp_path), "--train", "40", "--test", "10", "--seed", "3", "--test-floor", "1",
                 "--length-spread", "realistic"]) == 0
    assert (_read(tmp_path / "train.jsonl"), _read(tmp_path / "test.jsonl")) == generate_splits(
        40, 10, 3, test_floor=1, length_spread="realistic")
    with pytest.raises(ValueError, match=r"length_spread must be one of \('none', 'realistic'\), got 'long'"):
        generate_splits(4, 0, 0, length_spread="long")
