"""Data preparation: tokenized in the driver into one table, split back into train and test by index
(checked), handed to Ray as datasets with the columns a Ray Data tokenization gives."""

from __future__ import annotations

import numpy as np
import pytest

from catdpo_ray.config import load_config
from catdpo_ray.data.tables import batch_to_table, dataset_table, to_dataset
from catdpo_ray.ray_session import init_ray
from catdpo_ray.train.prepare import _split_table, load_pairs, resolve_model, tokenize_table


def test_split_by_index_checks_the_split_column_and_the_row_count() -> None:
    table = batch_to_table({"split": np.array([0, 0, 1], dtype=np.int8), "truncated": np.array([1, 0, 1])})
    train, test = _split_table(table, 2, 1)
    assert (train.num_rows, test.num_rows) == (2, 1)
    assert train.column("truncated").to_pylist() == [1, 0] and test.column("truncated").to_pylist() == [1]
    shuffled = batch_to_table({"split": np.array([0, 1, 0], dtype=np.int8), "truncated": np.array([0, 0, 0])})
    with pytest.raises(RuntimeError, match="lost the row order: the train split holds rows of the other split"):
        _split_table(shuffled, 2, 1)
    with pytest.raises(RuntimeError, match="returned 3 rows, expected 3 \\+ 1"):
        _split_table(table, 3, 1)


def test_driver_tokenization_has_ray_datas_tensor_columns_and_keeps_the_order(tiny_model_dir: str, tmp_path) -> None:
    """The table the driver builds holds, row by row, what ``PairTokenizer.encode_pair`` gives, in the
    column types a Ray Data ``map_batches`` output has (token ids: Ray's variable-shaped int32 tensors;
    the category mask: fixed-shape int8 tensors), and a dataset made from it hands the rows back in order."""
    import pyarrow as pa
    from ray.air.util.tensor_extensions.arrow import ArrowTensorTypeV2, ArrowVariableShapedTensorType

    from catdpo_ray.data.tokenize import PairTokenizer

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "data.max_train_rows=60", "data.max_test_rows=1"])
    init_ray(cfg)
    items = [{**p, "split": 0} for p in load_pairs(cfg, tmp_path, verbose=False).train]
    settings = {"tokenizer_path": resolve_model(cfg)[1], "prompt_template": cfg.data.prompt_template,
                "use_chat_template": False, "max_length": 48, "max_prompt_length": 24, "trust_remote_code": False}
    table = tokenize_table(items, settings=settings)
    assert table.num_rows == len(items)
    for name in ("chosen_ids", "rejected_ids"):
        assert isinstance(table.schema.field(name).type, ArrowVariableShapedTensorType)
        assert table.schema.field(name).type.value_type == pa.int32() and table.schema.field(name).type.ndim == 1
    assert isinstance(table.schema.field("categories").type, ArrowTensorTypeV2)
    assert table.schema.field("categories").type.value_type == pa.int8()
    tok = PairTokenizer(**settings)
    ours = to_dataset(table, 4)
    assert ours.num_blocks() == 4
    batch = ours.take_batch(len(items), batch_format="numpy")  # through Ray: the rows come back in order
    for i, item in enumerate(items):
        want = tok.encode_pair(item["prompt"], item["chosen"], item["rejected"])
        assert np.array_equal(batch["chosen_ids"][i], want["chosen_ids"]) and batch["chosen_ids"][i].dtype == np.int32
        assert np.array_equal(batch["rejected_ids"][i], want["rejected_ids"])
        assert (batch["chosen_start"][i], batch["truncated"][i]) == (want["chosen_start"], want["truncated"])
        assert np.array_equal(batch["categories"][i], np.asarray(item["categories"], dtype=np.int8))
    assert int(batch["truncated"].sum()) > 0  # the cut at max_length is exercised
    assert dataset_table(ours).equals(table)  # blocks back in order


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


def test_rank_shards_are_strided_equal_and_leave_out_only_the_remainder() -> None:
    """Rank r holds rows r, r + world, ...: global batch i is rows i*G .. (i+1)*G - 1 of the driver's order."""
    from catdpo_ray.data.tables import rank_shards

    init_ray(load_config(None, []))
    ids = np.array([np.arange(i % 5 + 1, dtype=np.int32) for i in range(11)], dtype=object)
    ds = to_dataset(batch_to_table({"row": np.arange(11), "chosen_ids": ids}), 3)
    shards = rank_shards(ds, 3)
    rows = [dataset_table(s).column("row").to_pylist() for s in shards]
    assert rows == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]  # 11 % 3 = 2 rows (9, 10) left out
    got = dataset_table(shards[1]).column("chosen_ids").to_pylist()
    assert [len(x) for x in got] == [2, 5, 3]  # the variable-length token ids travel with their rows
    assert [r for r in dataset_table(rank_shards(ds, 1)[0]).column("row").to_pylist()] == list(range(11))
