"""Data preparation on the driver: read, validate, pair, tokenize, add reference columns, split.

Run once per job (a sweep reuses it across trials, ARCHITECTURE.md "Contracts"): both splits are read
and paired before Ray starts (:func:`load_pairs`, so a bad file is reported at once), tokenized in one
pass in the driver (:func:`tokenize_table`; the process keeps its tokenizer between runs) into one
Arrow table, given the cached reference log-prob columns (:mod:`catdpo_ray.data.reference`; a cache
miss is scored here on CPUs, on a Ray Data actor pool on GPUs), split into train and test by row index
(checked against the ``split`` column) and handed to Ray as two materialised datasets
(:mod:`catdpo_ray.data.tables`).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from catdpo_ray.config import RunConfig
from catdpo_ray.data.loader import dropped_per_epoch, format_category_table, load_split
from catdpo_ray.data.tables import batch_to_table, column, to_dataset

if TYPE_CHECKING:
    from pathlib import Path

#: Pair mode of the held-out split: always safety-aware, so every loss is scored on the same pairs.
EVAL_PAIR_MODE = "safety_aware"


@dataclass
class PreparedData:
    """Tokenized, materialised Ray datasets plus what the plan needs to know about them."""

    train: Any
    test: Any
    num_train_pairs: int
    num_test_pairs: int
    model_path: str
    tokenizer_path: str
    report: dict[str, Any]
    #: Extra entries for the workers' plan dict (e.g. the on-policy prompt pool).
    worker_plan: dict[str, Any] = field(default_factory=dict)



def resolve_model(cfg: RunConfig) -> tuple[str, str]:
    """(model path, tokenizer path); ``tiny`` builds the bundled tiny model on first use."""
    path = cfg.model.name_or_path
    if path == "tiny":
        from catdpo_ray.tiny import ensure_tiny_model

        path = str(ensure_tiny_model(cfg.model.cache_dir))
    tok = path if cfg.model.tokenizer == "auto" else cfg.model.tokenizer
    return path, tok



@dataclass
class LoadedPairs:
    """Both splits read, validated and paired on the driver (no Ray needed)."""

    train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    train_report: Any
    test_report: Any


def load_pairs(cfg: RunConfig, run_dir: Path, *, verbose: bool = True) -> LoadedPairs:
    """Read + validate + pair both splits. Runs before Ray starts, so a bad or empty file is reported
    at once (file, row, field), not after the cluster and the tokenizer have started."""
    require_categories = cfg.loss.name == "catdpo"
    quarantine = run_dir / "quarantine.jsonl"
    train_pairs, train_rep = load_split(
        cfg.data, "train", pair_mode=cfg.pair_mode, require_categories=require_categories, quarantine_path=quarantine
    )
    test_pairs, test_rep = load_split(
        cfg.data, "test", pair_mode=EVAL_PAIR_MODE, require_categories=True, quarantine_path=quarantine
    )
    if verbose:
        print(f"[data] train {train_rep.describe()}")
        print(f"[data] test  {test_rep.describe()}")
        print("[data] train pairs per category:\n" + format_category_table(train_pairs, cfg.data.categories))
    plan_steps(cfg, len(train_pairs))  # a split too small for one global batch is refused here, before Ray
    return LoadedPairs(train_pairs, test_pairs, train_rep, test_rep)


def prepare_data(cfg: RunConfig, run_dir: Path, *, verbose: bool = True, loaded: LoadedPairs | None = None) -> PreparedData:
    """Read + validate + pair both splits on the driver (unless ``loaded``), tokenize into a Ray dataset,
    add the reference log-prob columns (the cached reference stage), split by index."""
    model_path, tokenizer_path = resolve_model(cfg)
    loaded = loaded or load_pairs(cfg, run_dir, verbose=verbose)
    train_pairs, test_pairs = list(loaded.train), loaded.test
    if cfg.train.shuffle:  # the first epoch's order; later epochs reshuffle in the workers (worker.py)
        random.Random(cfg.train.seed).shuffle(train_pairs)
    world = cfg.data_parallel_size

    # Both splits tokenized in one pass here, then the reference stage, then a split by row index: one
    # table in this process, in this order, until the finished splits become Ray datasets.
    items = [{**p, "split": 0} for p in train_pairs] + [{**p, "split": 1} for p in test_pairs]
    t0 = time.perf_counter()
    table = tokenize_table(items, settings={
        "tokenizer_path": tokenizer_path, "prompt_template": cfg.data.prompt_template,
        "use_chat_template": cfg.data.use_chat_template, "max_length": cfg.data.max_length,
        "max_prompt_length": cfg.data.max_prompt_length, "trust_remote_code": cfg.model.trust_remote_code})
    if verbose:
        print(f"[data] tokenized {len(train_pairs)} + {len(test_pairs)} pairs in {time.perf_counter() - t0:.1f}s",
              flush=True)
    # The reference stage scores both splits in one pass (one model load, one cache entry).
    table, reference = _reference_stage(cfg, table, model_path, tokenizer_path, verbose=verbose)
    train_t, test_t = _split_table(table, len(train_pairs), len(test_pairs))
    if reference["mode"] == "none" and (cfg.train.eval_before_after or cfg.train.eval_every):
        test_t, reference["test"] = _eval_reference(cfg, test_t, model_path, tokenizer_path, verbose=verbose)
    truncated = {"train": int(column(train_t, "truncated").sum()), "test": int(column(test_t, "truncated").sum())}
    if verbose and (truncated["train"] or truncated["test"]):
        print(f"[data] truncated to data.max_length / data.max_prompt_length: {truncated['train']} training and "
              f"{truncated['test']} test pairs", flush=True)
    blocks = max(2, world * 2)  # a few blocks per worker: the training split is streamed to every rank
    train_ds, test_ds = to_dataset(train_t, blocks), to_dataset(test_t, blocks)
    report: dict[str, Any] = {"train": loaded.train_report.to_dict(), "test": loaded.test_report.to_dict(),
                              "truncated": truncated, "pair_mode": cfg.pair_mode, "test_pair_mode": EVAL_PAIR_MODE,
                              "dropped_per_epoch": dropped_per_epoch(len(train_pairs), cfg.global_batch_size)}
    report["reference"] = reference
    worker_plan = _onpolicy_plan(cfg, train_pairs)
    return PreparedData(train_ds, test_ds, len(train_pairs), len(test_pairs), model_path, tokenizer_path, report,
                        worker_plan)


def tokenize_table(items: list[dict[str, Any]], *, settings: dict[str, Any]) -> Any:
    """Tokenize pair records in this (the driver's) process: one ``pyarrow.Table``, one row per record,
    in order (:mod:`catdpo_ray.data.tables`).

    Why here and not in Ray Data tasks: the records are already in this process (they were read and
    validated here), tokenization is single-threaded Python either way, and a fresh Ray worker process
    first imports transformers and loads the tokenizer. Measured on the 2070 pairs of the bundled data
    (2 cores): 1.8 s here (1.5 s of it the first import and load; the tokenizer is kept for the next
    run in the process), 4.8 s as one Ray Data task. A tokenizer error fails the preparation: every
    record is tokenized or none is used.
    """
    from catdpo_ray.data.tokenize import tokenize_pairs

    if not items:
        raise ValueError("no pairs to tokenize")
    columns = {key: np.empty(len(items), dtype=object) for key in items[0]}
    for i, item in enumerate(items):
        for key, values in columns.items():
            values[i] = np.asarray(item[key]) if key == "categories" else item[key]
    return batch_to_table(tokenize_pairs(columns, **settings))


def _split_table(table: Any, train_rows: int, test_rows: int) -> tuple[Any, Any]:
    """The one table -> (train, test) by row index; checks that the ``split`` column agrees."""
    if table.num_rows != train_rows + test_rows:
        raise RuntimeError(f"data preparation returned {table.num_rows} rows, expected {train_rows} + {test_rows}")
    train_t, test_t = table.slice(0, train_rows), table.slice(train_rows)
    for name, part, split in (("train", train_t, 0), ("test", test_t, 1)):
        if (column(part, "split") != split).any():
            raise RuntimeError(f"data preparation lost the row order: the {name} split holds rows of the other split")
    return train_t, test_t


def _reference_stage(cfg: RunConfig, table: Any, model_path: str, tokenizer_path: str, *,
                     verbose: bool) -> tuple[Any, dict[str, Any]]:
    """Reference log-prob columns for both splits (``model.reference=precompute``): the cached stage of
    :mod:`catdpo_ray.data.reference`. ``online``: none (the workers' frozen reference engine
    scores every batch, as before). ``none`` (reference-free losses): see :func:`_eval_reference`."""
    from catdpo_ray.data.reference import add_reference_table, resolve_reference_mode

    mode = resolve_reference_mode(cfg)
    info: dict[str, Any] = {"mode": mode}
    if mode == "precompute":
        table, info["pairs"] = add_reference_table(table, cfg=cfg, model_path=model_path, tokenizer_path=tokenizer_path,
                                                   split_name="train+test",
                                                   micro_batch_size=max(16, cfg.train.micro_batch_size))
        _say_reference(info["pairs"], verbose)
    return table, info


def _eval_reference(cfg: RunConfig, test_t: Any, model_path: str, tokenizer_path: str, *,
                    verbose: bool) -> tuple[Any, dict[str, Any]]:
    """SimPO trains without a reference, but its held-out implicit-reward accuracy still needs the true
    one: the test split alone goes through the stage (scored as DPO pairs would be)."""
    from catdpo_ray.data.reference import add_reference_table

    eval_cfg = cfg.replace({"loss.name": "dpo", "data.pairs": "safety_aware", "model.reference": "precompute"})
    test_t, info = add_reference_table(test_t, cfg=eval_cfg, model_path=model_path, tokenizer_path=tokenizer_path,
                                       split_name="test", micro_batch_size=max(16, cfg.train.micro_batch_size))
    _say_reference(info, verbose)
    return test_t, info


def _say_reference(info: dict[str, Any], verbose: bool) -> None:
    if verbose:
        how = "cache hit" if info["hit"] else f"computed in the {'driver' if info['scored_in'] == 'driver' else 'actor pool'}"
        print(f"[reference] {info['split']}: {info['rows']} pairs, {how} in {info['seconds']:.1f}s ({info['reason']})",
              flush=True)


def _onpolicy_plan(cfg: RunConfig, train_pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """The prompt pool of ``dual.violation=generation|blend`` (training prompts per category), for the workers."""
    if cfg.dual.violation not in ("generation", "blend"):
        return {}
    from catdpo_ray.train.onpolicy import prompt_table

    return {"onpolicy_prompts": prompt_table(train_pairs, list(cfg.data.categories), cfg.dual.generation_pool_per_category)}



def plan_steps(cfg: RunConfig, num_train_pairs: int) -> tuple[int, int]:
    """(steps per epoch, total steps). Every rank takes exactly this many steps."""
    steps_per_epoch = num_train_pairs // cfg.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"{num_train_pairs} training pairs do not fill one global batch of {cfg.global_batch_size} "
            "(train.micro_batch_size x train.grad_accum x scaling.num_workers)"
        )
    total = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    return steps_per_epoch, total


