"""The driver: config -> data -> MarginController actor -> TorchTrainer.fit() -> run directory.

``prepare_data`` reads, validates, pairs and tokenizes once (Ray Data ``map_batches``) and
materialises the result, so sweeps reuse it across trials; ``fit_run`` builds the trainer for one
run, shows progress while it trains, and writes the run directory (ARCHITECTURE.md "Contracts"):
``config.yaml``, ``metrics.jsonl``, ``lambdas.csv``, ``final/``, ``summary.json``,
``before_after.md``, ``lambdas.png``, ``data_report.json`` and ``quarantine.jsonl`` when rows were
quarantined.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from catdpo_ray.config import RunConfig, to_yaml
from catdpo_ray.data.loader import format_category_table, load_split

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


def unique_run_name(cfg: RunConfig) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{cfg.loss.name}-{stamp}-{secrets.token_hex(2)}"


def init_ray(cfg: RunConfig) -> None:
    """Connect to ``scaling.ray_address`` / ``$RAY_ADDRESS``, or start a local cluster."""
    import ray

    if ray.is_initialized():
        return
    import logging

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Deterministic row order through map_batches: same seed + same data = same batches.
    ctx.execution_options.preserve_order = True
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    address = cfg.scaling.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True, configure_logging=True, logging_level="WARNING")


def resolve_model(cfg: RunConfig) -> tuple[str, str]:
    """(model path, tokenizer path); ``tiny`` builds the bundled tiny model on first use."""
    path = cfg.model.name_or_path
    if path == "tiny":
        from catdpo_ray.tiny import ensure_tiny_model

        path = str(ensure_tiny_model(cfg.model.cache_dir))
    tok = path if cfg.model.tokenizer == "auto" else cfg.model.tokenizer
    return path, tok


def prepare_data(cfg: RunConfig, run_dir: Path, *, verbose: bool = True) -> PreparedData:
    """Read + validate + pair both splits on the driver, tokenize with Ray Data, materialise."""
    import ray.data

    from catdpo_ray.data.tokenize import PairTokenizer

    model_path, tokenizer_path = resolve_model(cfg)
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
    if cfg.train.shuffle:  # the first epoch's order; later epochs reshuffle in the workers (worker.py)
        random.Random(cfg.train.seed).shuffle(train_pairs)
    world = cfg.data_parallel_size
    if len(test_pairs) < world:
        raise ValueError(f"the test split has {len(test_pairs)} pairs, fewer than the {world} workers")

    # One Ray Data pass for both splits: one tokenizer actor start-up (importing transformers is
    # most of the cost on small corpora), then a cheap columnar filter per split.
    items = [{**p, "split": 0} for p in train_pairs] + [{**p, "split": 1} for p in test_pairs]
    t0 = time.perf_counter()
    tokenized = ray.data.from_items(items, override_num_blocks=max(2, world * 2)).map_batches(
        PairTokenizer,
        fn_constructor_kwargs={
            "tokenizer_path": tokenizer_path,
            "prompt_template": cfg.data.prompt_template,
            "use_chat_template": cfg.data.use_chat_template,
            "max_length": cfg.data.max_length,
            "max_prompt_length": cfg.data.max_prompt_length,
            "trust_remote_code": cfg.model.trust_remote_code,
        },
        batch_size=512,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.5,
    ).materialize()
    train_ds = tokenized.filter(expr="split == 0").materialize()
    test_ds = tokenized.filter(expr="split == 1").materialize()
    truncated = {"train": _column_total(train_ds, "truncated"), "test": _column_total(test_ds, "truncated")}
    if verbose:
        print(f"[data] tokenized {len(train_pairs)} + {len(test_pairs)} pairs in {time.perf_counter() - t0:.1f}s; "
              f"truncated pairs: train {truncated['train']}, test {truncated['test']}")
    report = {"train": train_rep.to_dict(), "test": test_rep.to_dict(), "truncated": truncated,
              "pair_mode": cfg.pair_mode, "test_pair_mode": EVAL_PAIR_MODE}
    return PreparedData(train_ds, test_ds, len(train_pairs), len(test_pairs), model_path, tokenizer_path, report)


def _column_total(ds: Any, column: str) -> int:
    """Sum of one int column, streamed (``Dataset.sum`` starts a hash-aggregate shuffle: ~10 s here)."""
    return int(sum(int(b[column].sum()) for b in ds.select_columns([column]).iter_batches(batch_size=None, batch_format="numpy")))


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


def make_controller(cfg: RunConfig) -> Any:
    """The MarginController actor, pinned to the driver's node, holding no CPU."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from catdpo_ray.train.controller import MarginController

    node = ray.get_runtime_context().get_node_id()
    actor_cls = ray.remote(num_cpus=0)(MarginController)
    return actor_cls.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
        list(cfg.data.categories),
        eta=cfg.dual.eta,
        epsilon=cfg.dual.epsilon,
        lambda_init=cfg.dual.lambda_init,
        lambda_max=cfg.dual.lambda_max,
        update_every=cfg.dual.update_every,
    )


def build_trainer(cfg: RunConfig, data: PreparedData, plan: dict[str, Any], controller: Any, run_name: str,
                  storage: str, callbacks: list[Any] | None = None) -> Any:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from catdpo_ray.train.worker import train_loop_per_worker

    sc = cfg.scaling
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "plan": plan, "controller": controller},
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker={"CPU": sc.cpus_per_worker, **({"GPU": 1} if sc.use_gpu else {})},
            placement_strategy=sc.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.output.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.output.num_checkpoints_to_keep),
            callbacks=callbacks or [],
        ),
        datasets={"train": data.train, "test": data.test},
    )


def storage_location(cfg: RunConfig) -> str:
    """Ray Train's ``storage_path``: a URI (``s3://``, ``gs://``, ``file://`` ...) is passed through as
    it is (Ray writes there via pyarrow); a plain path is made absolute (default ``<output.dir>/ray_storage``)."""
    path = cfg.output.storage_path
    if path and "://" in path:
        return path.rstrip("/")
    return str(Path(path or Path(cfg.output.dir) / "ray_storage").resolve())


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    error: BaseException | None


def fit_run(cfg: RunConfig, data: PreparedData, run_dir: Path, run_name: str, *,
            callbacks: list[Any] | None = None) -> RunResult:
    """Train one run on prepared data; drain progress from the controller while ``fit`` runs."""
    from catdpo_ray.train.sinks import MetricSinks

    steps_per_epoch, total = plan_steps(cfg, data.num_train_pairs)
    storage = storage_location(cfg)
    local_root = run_dir if "://" in storage else Path(storage) / run_name
    plan = {"model_path": data.model_path, "tokenizer_path": data.tokenizer_path, "steps_per_epoch": steps_per_epoch,
            "total_steps": total, "run_name": run_name, "local_checkpoint_dir": str(local_root / "local_checkpoints")}
    controller = make_controller(cfg)
    trainer = build_trainer(cfg, data, plan, controller, run_name, storage, callbacks)
    sinks = MetricSinks(cfg, run_dir, total)
    print(f"[train] {cfg.loss.name} on {cfg.scaling.num_workers} worker(s), ZeRO-{cfg.train.zero_stage} "
          f"{cfg.train.precision}; global batch {cfg.global_batch_size} pairs; {total} steps "
          f"({steps_per_epoch}/epoch); run {run_name}", flush=True)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            outcome["error"] = exc

    t0 = time.perf_counter()
    thread = threading.Thread(target=target, name="catdpo-fit", daemon=True)
    thread.start()
    import ray

    while thread.is_alive():
        thread.join(timeout=1.0)
        for row in ray.get(controller.drain.remote()):
            sinks.handle(row)
    for row in ray.get(controller.drain.remote()):
        sinks.handle(row)
    sinks.close()
    wall = time.perf_counter() - t0
    error = outcome.get("error")
    result = outcome.get("result")
    if error is None and result is not None and getattr(result, "error", None) is not None:
        error = result.error
    summary: dict[str, Any] = {"run_name": run_name, "wall_time_s": wall, "total_steps": total,
                               "steps_per_epoch": steps_per_epoch, "data": data.report,
                               "last_step": sinks.last_step, "final_eval": sinks.last_eval,
                               "status": "failed" if error is not None else "finished"}
    if error is None and result is not None and result.checkpoint is not None and cfg.output.save_final:
        _export_final(result.checkpoint, run_dir, cfg, sinks)
    if error is not None:
        summary["error"] = f"{type(error).__name__}: {error}"
    from catdpo_ray.eval.report import write_run_outputs

    write_run_outputs(run_dir, cfg, summary)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return RunResult(run_dir, summary, error)


def _export_final(checkpoint: Any, run_dir: Path, cfg: RunConfig, sinks: Any) -> None:
    from catdpo_ray.eval.report import model_card

    final = run_dir / "final"
    with checkpoint.as_directory() as d:
        src = Path(d) / "hf_model"
        if not src.exists():
            raise FileNotFoundError(f"the final checkpoint {d} has no hf_model/ export")
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(src, final)
    (final / "README.md").write_text(model_card(cfg, sinks.last_step, sinks.last_eval))


def run_training(cfg: RunConfig) -> RunResult:
    """``catdpo-ray train``: the whole main job."""
    run_name = cfg.output.name or unique_run_name(cfg)
    run_dir = Path(cfg.output.dir).resolve() / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    init_ray(cfg)
    data = prepare_data(cfg, run_dir)
    (run_dir / "data_report.json").write_text(json.dumps(data.report, indent=2))
    result = fit_run(cfg, data, run_dir, run_name)
    return result
