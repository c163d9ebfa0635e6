"""Data preparation on the driver: read, validate, pair, tokenize, add reference columns, split.

Run once per job (a sweep reuses it across trials, ARCHITECTURE.md "Contracts"): both splits are read
and paired before Ray starts (:func:`load_pairs`, so a bad file is reported at once), then tokenized
in one Ray Data pass (:func:`catdpo_ray.data.tokenize.tokenize_pairs` tasks; each worker process
keeps its tokenizer between runs), given the cached reference log-prob columns
(:mod:`catdpo_ray.data.reference`), and split back into train and test by row index (the order is
preserved end to end and checked while the truncation counts are summed).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from catdpo_ray.config import RunConfig
from catdpo_ray.data.loader import dropped_per_epoch, format_category_table, load_split

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
    """Read + validate + pair both splits on the driver (unless ``loaded``), tokenize with Ray Data,
    add the reference log-prob columns (the cached reference stage), materialise."""
    import ray.data

    from catdpo_ray.data.tokenize import tokenize_pairs

    model_path, tokenizer_path = resolve_model(cfg)
    loaded = loaded or load_pairs(cfg, run_dir, verbose=verbose)
    train_pairs, test_pairs = list(loaded.train), loaded.test
    if cfg.train.shuffle:  # the first epoch's order; later epochs reshuffle in the workers (worker.py)
        random.Random(cfg.train.seed).shuffle(train_pairs)
    world = cfg.data_parallel_size

    # One Ray Data pass for both splits (tasks: a worker process that tokenized before reuses its loaded
    # tokenizer), then the reference stage, then a split by row index: the order is kept end to end.
    items = [{**p, "split": 0} for p in train_pairs] + [{**p, "split": 1} for p in test_pairs]
    t0 = time.perf_counter()
    ctx = ray.data.DataContext.get_current()
    keep_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        tokenized = ray.data.from_items(items, override_num_blocks=max(2, world * 2)).map_batches(
            tokenize_pairs,
            fn_kwargs={
                "tokenizer_path": tokenizer_path,
                "prompt_template": cfg.data.prompt_template,
                "use_chat_template": cfg.data.use_chat_template,
                "max_length": cfg.data.max_length,
                "max_prompt_length": cfg.data.max_prompt_length,
                "trust_remote_code": cfg.model.trust_remote_code,
            },
            batch_size=512,
            batch_format="numpy",
            num_cpus=0.5,  # an exception in the tokenizer is not retried: it fails the run at once
            # One task at a time: every process that tokenizes first imports transformers and loads the
            # tokenizer (seconds); one warm process is faster than several cold ones on small corpora.
            concurrency=1,
        ).materialize()
    finally:
        ctx.execution_options.preserve_order = keep_order
    if verbose:
        print(f"[data] tokenized {len(train_pairs)} + {len(test_pairs)} pairs in {time.perf_counter() - t0:.1f}s",
              flush=True)
    # The reference stage scores both splits in one pass (one actor start, one model load, one cache entry).
    tokenized, reference = _reference_stage(cfg, tokenized, model_path, tokenizer_path, verbose=verbose)
    train_ds, test_ds = tokenized.split_at_indices([len(train_pairs)])
    if reference["mode"] == "none" and (cfg.train.eval_before_after or cfg.train.eval_every):
        test_ds, reference["test"] = _eval_reference(cfg, test_ds, model_path, tokenizer_path, verbose=verbose)
    truncated = {"train": _truncated_in_split(train_ds, 0, len(train_pairs)),
                 "test": _truncated_in_split(test_ds, 1, len(test_pairs))}
    if verbose and (truncated["train"] or truncated["test"]):
        print(f"[data] truncated to data.max_length / data.max_prompt_length: {truncated['train']} training and "
              f"{truncated['test']} test pairs", flush=True)
    report: dict[str, Any] = {"train": loaded.train_report.to_dict(), "test": loaded.test_report.to_dict(),
                              "truncated": truncated, "pair_mode": cfg.pair_mode, "test_pair_mode": EVAL_PAIR_MODE,
                              "dropped_per_epoch": dropped_per_epoch(len(train_pairs), cfg.global_batch_size)}
    report["reference"] = reference
    worker_plan = _onpolicy_plan(cfg, train_pairs)
    return PreparedData(train_ds, test_ds, len(train_pairs), len(test_pairs), model_path, tokenizer_path, report,
                        worker_plan)


def _reference_stage(cfg: RunConfig, tokenized: Any, model_path: str, tokenizer_path: str, *,
                     verbose: bool) -> tuple[Any, dict[str, Any]]:
    """Reference log-prob columns for both splits (``model.reference=precompute``): the cached Ray Data
    stage of :mod:`catdpo_ray.data.reference`. ``online``: none (the workers' frozen reference engine
    scores every batch, as before). ``none`` (reference-free losses): see :func:`_eval_reference`."""
    from catdpo_ray.data.reference import add_reference_columns, resolve_reference_mode

    mode = resolve_reference_mode(cfg)
    info: dict[str, Any] = {"mode": mode}
    if mode == "precompute":
        tokenized, info["pairs"] = add_reference_columns(tokenized, cfg=cfg, model_path=model_path,
                                                         tokenizer_path=tokenizer_path, split_name="train+test",
                                                         micro_batch_size=max(16, cfg.train.micro_batch_size))
        _say_reference(info["pairs"], verbose)
    return tokenized, info


def _eval_reference(cfg: RunConfig, test_ds: Any, model_path: str, tokenizer_path: str, *,
                    verbose: bool) -> tuple[Any, dict[str, Any]]:
    """SimPO trains without a reference, but its held-out implicit-reward accuracy still needs the true
    one: the test split alone goes through the stage (scored as DPO pairs would be)."""
    from catdpo_ray.data.reference import add_reference_columns

    eval_cfg = cfg.replace({"loss.name": "dpo", "data.pairs": "safety_aware", "model.reference": "precompute"})
    test_ds, info = add_reference_columns(test_ds, cfg=eval_cfg, model_path=model_path, tokenizer_path=tokenizer_path,
                                          split_name="test", micro_batch_size=max(16, cfg.train.micro_batch_size))
    _say_reference(info, verbose)
    return test_ds, info


def _say_reference(info: dict[str, Any], verbose: bool) -> None:
    if verbose:
        print(f"[reference] {info['split']}: {info['rows']} pairs, {'cache hit' if info['hit'] else 'computed'} in "
              f"{info['seconds']:.1f}s ({info['reason']})", flush=True)


def _onpolicy_plan(cfg: RunConfig, train_pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """The prompt pool of ``dual.violation=generation|blend`` (training prompts per category), for the workers."""
    if cfg.dual.violation not in ("generation", "blend"):
        return {}
    from catdpo_ray.train.onpolicy import prompt_table

    return {"onpolicy_prompts": prompt_table(train_pairs, list(cfg.data.categories), cfg.dual.generation_pool_per_category)}



def _truncated_in_split(ds: Any, split: int, rows: int) -> int:
    """Truncated pairs of one split, streamed; checks on the way that every row belongs to ``split`` and
    that there are ``rows`` of them (the split by index relies on the order Ray Data preserved)."""
    truncated = seen = 0
    for b in ds.select_columns(["split", "truncated"]).iter_batches(batch_size=None, batch_format="numpy"):
        if (b["split"] != split).any():
            raise RuntimeError(f"data preparation lost the row order: the {('train', 'test')[split]} split holds "
                               "rows of the other split")
        truncated += int(b["truncated"].sum())
        seen += len(b["split"])
    if seen != rows:
        raise RuntimeError(f"data preparation returned {seen} {('train', 'test')[split]} rows, expected {rows}")
    return truncated


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


