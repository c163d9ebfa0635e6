"""Data preparation splits the tokenized rows back into train and test by index; the split is checked."""

from __future__ import annotations

import pytest

from catdpo_ray.config import load_config
from catdpo_ray.ray_session import init_ray
from catdpo_ray.train.prepare import _truncated_in_split


def test_split_by_index_counts_truncation_and_refuses_a_lost_order() -> None:
    import ray.data

    init_ray(load_config(None, []))
    rows = [{"split": 0, "truncated": 1}, {"split": 0, "truncated": 0}, {"split": 1, "truncated": 1}]
    train, test = ray.data.from_items(rows).materialize().split_at_indices([2])
    assert (_truncated_in_split(train, 0, 2), _truncated_in_split(test, 1, 1)) == (1, 1)
    with pytest.raises(RuntimeError, match="lost the row order: the train split holds rows of the other split"):
        _truncated_in_split(ray.data.from_items(rows), 0, 3)
    with pytest.raises(RuntimeError, match="returned 2 train rows, expected 3"):
        _truncated_in_split(train, 0, 3)


def test_tokenize_pairs_keeps_one_tokenizer_per_process_until_its_files_change(tiny_model_dir: str, tmp_path) -> None:
    import os
    import shutil

    import numpy as np

    from catdpo_ray.data import tokenize as T

    tok_dir = tmp_path / "tok"
    shutil.copytree(tiny_model_dir, tok_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    settings = {"tokenizer_path": str(tok_dir), "prompt_template": "USER: {prompt} ASSISTANT:",
                "use_chat_template": False, "max_length": 32, "max_prompt_length": 16}
    batch = {"prompt": np.array(["hi"]), "chosen": np.array(["no"]), "rejected": np.array(["yes"]),
             "safety_gap": np.array([1]), "categories": [np.array([1, 0])], "chosen_safe": np.array([1]),
             "rejected_safe": np.array([0])}
    first = T.tokenize_pairs(batch, **settings)
    loaded = next(iter(T._TOKENIZERS.values()))
    again = T.tokenize_pairs(batch, **settings)
    assert next(iter(T._TOKENIZERS.values())) is loaded  # reused, not reloaded
    assert np.array_equal(first["chosen_ids"][0], again["chosen_ids"][0])
    config = tok_dir / "tokenizer_config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))  # a rebuilt tokenizer
    T.tokenize_pairs(batch, **settings)
    assert len(T._TOKENIZERS) == 1 and next(iter(T._TOKENIZERS.values())) is not loaded
    T.tokenize_pairs(batch, **{**settings, "max_length": 24})  # other settings: another tokenizer, still one held
    assert len(T._TOKENIZERS) == 1 and next(iter(T._TOKENIZERS.values())).max_length == 24
