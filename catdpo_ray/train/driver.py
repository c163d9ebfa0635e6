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
import random
import secrets
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from catdpo_ray.config import RunConfig, check_paths, load_config, to_yaml
from catdpo_ray.data.loader import describe_dropped, dropped_per_epoch, format_category_table, load_split
from catdpo_ray.train import faults
from catdpo_ray.train.sinks import atomic_write_text

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


def unique_run_name(cfg: RunConfig) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{cfg.loss.name}-{stamp}-{secrets.token_hex(2)}"


def init_ray(cfg: RunConfig) -> None:
    """Kept for callers of ``train.driver.init_ray``; the helper lives in :mod:`catdpo_ray.ray_session`."""
    from catdpo_ray.ray_session import init_ray as _init_ray

    _init_ray(cfg)


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

    from catdpo_ray.data.tokenize import PairTokenizer

    model_path, tokenizer_path = resolve_model(cfg)
    loaded = loaded or load_pairs(cfg, run_dir, verbose=verbose)
    train_pairs, test_pairs = list(loaded.train), loaded.test
    if cfg.train.shuffle:  # the first epoch's order; later epochs reshuffle in the workers (worker.py)
        random.Random(cfg.train.seed).shuffle(train_pairs)
    world = cfg.data_parallel_size

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
        max_restarts=0,  # a failed tokenizer fails the run at once (and Ray prints no restart caveat)
    ).materialize()
    # The reference stage scores both splits in one pass (one actor start, one model load, one cache entry).
    tokenized, reference = _reference_stage(cfg, tokenized, model_path, tokenizer_path, verbose=verbose)
    train_ds = tokenized.filter(expr="split == 0").materialize()
    test_ds = tokenized.filter(expr="split == 1").materialize()
    if reference["mode"] == "none" and (cfg.train.eval_before_after or cfg.train.eval_every):
        test_ds, reference["test"] = _eval_reference(cfg, test_ds, model_path, tokenizer_path, verbose=verbose)
    truncated = {"train": _column_total(train_ds, "truncated"), "test": _column_total(test_ds, "truncated")}
    if verbose:
        print(f"[data] tokenized {len(train_pairs)} + {len(test_pairs)} pairs in {time.perf_counter() - t0:.1f}s; "
              f"truncated pairs: train {truncated['train']}, test {truncated['test']}")
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


def make_controller(cfg: RunConfig, run_id: str) -> Any:
    """The MarginController actor, pinned to the driver's node, holding no CPU.

    ``max_restarts=-1``: if the actor dies, Ray re-creates it (empty); rank 0 notices on its next call
    and re-seeds it from its mirror of the last state (see :class:`catdpo_ray.train.controller.ControllerLink`),
    so the run goes on instead of ending with ``ActorDiedError``. Calls in flight are retried.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from catdpo_ray.train.controller import MarginController

    node = ray.get_runtime_context().get_node_id()
    try:  # a previous attempt of this run in the same Ray session (a rerun in one process): replace it
        ray.kill(ray.get_actor(controller_name(run_id)), no_restart=True)
    except ValueError:
        pass
    actor_cls = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(MarginController)
    return actor_cls.options(name=controller_name(run_id), scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
                             ).remote(
        list(cfg.data.categories),
        eta=cfg.dual.eta,
        epsilon=cfg.dual.epsilon,
        lambda_init=cfg.dual.lambda_init,
        lambda_max=cfg.dual.lambda_max,
        update_every=cfg.dual.update_every,
    )


def controller_name(run_id: str) -> str:
    """The controller actor's name (tests find it by this to kill it)."""
    return f"catdpo-controller-{run_id}"


def build_trainer(cfg: RunConfig, data: PreparedData, plan: dict[str, Any], controller: Any, run_name: str,
                  storage: str, callbacks: list[Any] | None = None) -> Any:
    import ray.train
    from ray.train import DataConfig
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
        # Only the training split is sharded; every rank sees the whole test split and scores its own
        # strided share, so no held-out pair is dropped (RAY_DEEPSPEED_NOTES.md pitfall 14).
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )


def storage_location(cfg: RunConfig) -> str:
    """Ray Train's ``storage_path``: a URI (``s3://``, ``gs://``, ``file://`` ...) is passed through as
    it is (Ray writes there via pyarrow); a plain path is made absolute (default ``<output.dir>/ray_storage``)."""
    path = cfg.output.storage_path
    if path and "://" in path:
        return path.rstrip("/")
    return str(Path(path or Path(cfg.output.dir) / "ray_storage").resolve())


def run_identity(run_dir: Path) -> str:
    """The run's id (``run.json``), created on its first start: checkpoints are tied to it, so a
    storage folder holding another run's checkpoints under the same name is never loaded."""
    path = run_dir / "run.json"
    if path.exists():
        return str(json.loads(path.read_text())["run_id"])
    run_id = uuid.uuid4().hex[:16]
    atomic_write_text(path, json.dumps({"run_id": run_id, "created": datetime.now(timezone.utc).isoformat()}))
    return run_id


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    error: BaseException | None


def resume_command(cfg: RunConfig, run_dir: Path) -> str:
    """The exact command that resumes this run."""
    return f"catdpo-ray train --config {run_dir / 'config.yaml'} output.name={run_dir.name} output.dir={run_dir.parent}"


def fit_run(cfg: RunConfig, data: PreparedData, run_dir: Path, run_name: str, *,
            callbacks: list[Any] | None = None) -> RunResult:
    """Train one run on prepared data; drain progress from the controller while ``fit`` runs."""
    import ray

    from catdpo_ray.train.sinks import MetricSinks

    steps_per_epoch, total = plan_steps(cfg, data.num_train_pairs)
    storage = storage_location(cfg)
    local_root = run_dir if "://" in storage else Path(storage) / run_name
    run_id = run_identity(run_dir)
    plan = {"model_path": data.model_path, "tokenizer_path": data.tokenizer_path, "steps_per_epoch": steps_per_epoch,
            "total_steps": total, "run_name": run_name, "run_id": run_id, "num_train_pairs": data.num_train_pairs,
            "num_test_pairs": data.num_test_pairs, "local_checkpoint_dir": str(local_root / "local_checkpoints"),
            "storage_run_dir": None if "://" in storage else str(Path(storage) / run_name),
            "final_dir": str(run_dir / "final"), "fault": faults.from_environment(), **data.worker_plan}
    controller = make_controller(cfg, run_id)
    trainer = build_trainer(cfg, data, plan, controller, run_name, storage, callbacks)
    sinks = MetricSinks(cfg, run_dir, total)
    dropped = dropped_per_epoch(data.num_train_pairs, cfg.global_batch_size)
    print(f"[train] {cfg.loss.name} on {cfg.scaling.num_workers} worker(s), ZeRO-{cfg.train.zero_stage} "
          f"{cfg.train.precision}; global batch {cfg.global_batch_size} pairs; {total} steps "
          f"({steps_per_epoch}/epoch); reference {data.report.get('reference', {}).get('mode', 'online')}; "
          f"run {run_name}", flush=True)
    if (msg := describe_dropped(data.num_train_pairs, cfg.global_batch_size)):
        print(f"[data] {msg}", flush=True)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            outcome["error"] = exc

    t0 = time.perf_counter()
    thread = threading.Thread(target=target, name="catdpo-fit", daemon=True)
    thread.start()
    interrupted = False
    try:
        while thread.is_alive():
            thread.join(timeout=1.0)
            _drain(controller, sinks)
        _drain(controller, sinks)
    except KeyboardInterrupt:
        interrupted = True
        print("\n[train] interrupted (Ctrl-C): stopping the workers ...", file=sys.stderr, flush=True)
        _drain(controller, sinks, final=True)
    sinks.close()
    ray.kill(controller, no_restart=True)  # its rows are drained; a rerun creates a fresh one
    wall = time.perf_counter() - t0
    error = outcome.get("error")
    result = outcome.get("result")
    if error is None and result is not None and getattr(result, "error", None) is not None:
        error = result.error
    status = "interrupted" if interrupted else ("failed" if error is not None else "finished")
    summary: dict[str, Any] = {"run_name": run_name, "run_id": run_id, "wall_time_s": wall, "total_steps": total,
                               "steps_per_epoch": steps_per_epoch, "trailing_pairs_skipped_per_epoch": dropped,
                               "data": data.report, "last_step": sinks.last_step, "final_eval": sinks.last_eval,
                               "status": status}
    if interrupted:
        error = KeyboardInterrupt()
        summary["resume_command"] = resume_command(cfg, run_dir)
        summary["error"] = "interrupted by the user (Ctrl-C)"
    elif error is not None:
        summary["error"] = f"{type(error).__name__}: {error}"
    elif cfg.output.save_final:
        _finish_export(run_dir, cfg, sinks)
    from catdpo_ray.eval.report import write_run_outputs

    if not interrupted:
        write_run_outputs(run_dir, cfg, summary)
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    if interrupted:
        print(f"[train] stopped at step {(sinks.last_step or {}).get('step', 0)}; checkpoints are kept. Resume with:\n"
              f"  {summary['resume_command']}", file=sys.stderr, flush=True)
    return RunResult(run_dir, summary, error)


def _drain(controller: Any, sinks: Any, *, final: bool = False) -> None:
    """Move the controller's pending rows into the sinks; tolerate a controller being restarted."""
    import ray
    from ray.exceptions import RayActorError

    try:
        rows = ray.get(controller.drain.remote(), timeout=5.0 if final else 60.0)
    except (RayActorError, ray.exceptions.GetTimeoutError):
        return  # restarted or busy: the rows are replayed by rank 0 and drained next time
    for row in rows:
        sinks.handle(row)


def _finish_export(run_dir: Path, cfg: RunConfig, sinks: Any) -> None:
    """The workers wrote ``final/`` (sharded safetensors, tokenizer); add the model card."""
    from catdpo_ray.eval.report import model_card

    final = run_dir / "final"
    if not (final / "config.json").exists():
        raise FileNotFoundError(f"the run finished but {final} holds no exported model (config.json missing)")
    atomic_write_text(final / "README.md", model_card(cfg, sinks.last_step, sinks.last_eval))


def run_training(cfg: RunConfig) -> RunResult:
    """``catdpo-ray train``: the whole main job.

    A run directory that already holds a ``config.yaml`` is a resume: the new config must agree with it
    on every key that may not change (:func:`catdpo_ray.train.resume.check_resume`), checked here before
    Ray starts; the original ``config.yaml`` is never overwritten, resumable changes are recorded beside
    it (``resumes.jsonl``).
    """
    from catdpo_ray.train.console import setup_console
    from catdpo_ray.train.resume import check_resume, record_resume

    check_paths(cfg)  # model / tokenizer / data paths, before anything is written or started
    run_name = cfg.output.name or unique_run_name(cfg)
    run_dir = Path(cfg.output.dir).resolve() / run_name
    saved_path = run_dir / "config.yaml"
    if saved_path.exists():
        saved = load_config(saved_path).to_dict()
        changes = check_resume(saved, cfg.to_dict(), run_name=run_name)  # raises ResumeRefused naming each key
        record_resume(run_dir, changes, newest_checkpoint_step(cfg, run_dir, run_name))
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved_path, to_yaml(cfg))
    loaded = load_pairs(cfg, run_dir)  # bad/empty files are reported before Ray starts
    init_ray(cfg)
    console = setup_console(run_dir)  # framework noise -> <run>/logs/framework.log
    try:
        data = prepare_data(cfg, run_dir, loaded=loaded)
        atomic_write_text(run_dir / "data_report.json", json.dumps(data.report, indent=2))
        preflight(cfg, data.model_path)
        return fit_run(cfg, data, run_dir, run_name)
    finally:
        console.close()


def newest_checkpoint_step(cfg: RunConfig, run_dir: Path, run_name: str) -> int:
    """The step of the newest checkpoint on disk for this run (0 if none; URI storage: -1, unknown).
    Informational (``resumes.jsonl``): the workers verify and choose, and log what they loaded."""
    from catdpo_ray.train.checkpointing import STATE_FILE

    storage = storage_location(cfg)
    if "://" in storage:
        return -1
    roots = [Path(storage) / run_name, Path(storage) / run_name / "local_checkpoints", run_dir / "local_checkpoints"]
    steps = [0]
    for root in roots:
        for state in root.glob(f"checkpoint_*/{STATE_FILE}"):
            try:
                steps.append(int(json.loads(state.read_text())["step"]))
            except (OSError, ValueError, KeyError):
                continue
    return max(steps)


def preflight(cfg: RunConfig, model_path: str) -> None:
    """Before GPU workers start: plan the job's memory (``catdpo-ray plan``) against the GPUs Ray can
    give, and refuse (``scaling.plan_check=refuse``) or warn about a job that cannot fit."""
    if not cfg.scaling.use_gpu or cfg.scaling.plan_check == "off":
        return
    from catdpo_ray.plan import Hardware, format_plan
    from catdpo_ray.plan import preflight as plan_preflight

    gpu_memory, gpus_per_node = probe_gpus()
    result = plan_preflight(cfg, model_path, Hardware(gpu_memory=gpu_memory, gpus_per_node=gpus_per_node))
    if result.fits:
        print(f"[plan] fits: {result.plan.device_total / 2**30:.1f} GiB planned per GPU of {gpu_memory / 2**30:.1f} GiB",
              flush=True)
        return
    text = format_plan(result)
    if cfg.scaling.plan_check == "refuse":
        raise PlanRefused(f"the job does not fit the GPUs (scaling.plan_check=refuse; scaling.plan_check=warn runs it "
                          f"anyway):\n{text}")
    print(f"[plan] WARNING: the job may not fit (scaling.plan_check=warn):\n{text}", flush=True)


class PlanRefused(RuntimeError):
    """The memory plan says the job cannot fit (``scaling.plan_check=refuse``)."""


def probe_gpus() -> tuple[int, int]:
    """(memory of one GPU in bytes, GPUs per node) as Ray sees the cluster (a remote task: the head node
    may have no GPU)."""
    import ray

    def total_memory() -> int:
        import torch

        return int(torch.cuda.get_device_properties(0).total_memory)

    memory = ray.get(ray.remote(num_gpus=1)(total_memory).remote())
    per_node = [int(n.get("Resources", {}).get("GPU", 0)) for n in ray.nodes() if n.get("Alive")]
    return memory, max([g for g in per_node if g > 0] or [1])
