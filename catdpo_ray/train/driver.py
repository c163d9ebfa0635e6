"""The driver: config -> data -> MarginController actor -> TorchTrainer.fit() -> run directory.

``prepare_data`` (:mod:`.prepare`) reads, validates, pairs and tokenizes once into a materialised
Ray dataset, so sweeps reuse it across trials; ``fit_run`` builds the trainer for one
run, shows progress while it trains, and writes the run directory (ARCHITECTURE.md "Contracts"):
``config.yaml``, ``metrics.jsonl``, ``lambdas.csv``, ``final/``, ``summary.json``,
``before_after.md``, ``lambdas.png``, ``data_report.json`` and ``quarantine.jsonl`` when rows were
quarantined.
"""

from __future__ import annotations

import json
import secrets
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from catdpo_ray.config import RunConfig, load_config, to_yaml
from catdpo_ray.config_locations import check_paths
from catdpo_ray.data.loader import describe_dropped, dropped_per_epoch
from catdpo_ray.train import faults
from catdpo_ray.train.prepare import (  # noqa: F401 - the driver's public names, kept for their callers
    EVAL_PAIR_MODE,
    LoadedPairs,
    PreparedData,
    load_pairs,
    plan_steps,
    prepare_data,
    resolve_model,
)
from catdpo_ray.train.sinks import atomic_write_text


def unique_run_name(cfg: RunConfig) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{cfg.loss.name}-{stamp}-{secrets.token_hex(2)}"


def init_ray(cfg: RunConfig) -> None:
    """Kept for callers of ``train.driver.init_ray``; the helper lives in :mod:`catdpo_ray.ray_session`."""
    from catdpo_ray.ray_session import init_ray as _init_ray

    _init_ray(cfg)


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

    from catdpo_ray.data.tables import rank_shards, train_shard_name
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
        # The training split is sharded here, one dataset per rank (strided rows, equal sizes: rank_shards);
        # every rank sees the whole test split and scores its own strided share, so no held-out pair is
        # dropped (RAY_DEEPSPEED_NOTES.md pitfall 14). Ray Train splits nothing.
        datasets={**{train_shard_name(r): shard for r, shard in enumerate(rank_shards(data.train, cfg.data_parallel_size))},
                  "test": data.test},
        dataset_config=DataConfig(datasets_to_split=[]),
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
    sinks.fit_start_time = time.time()
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
    summary: dict[str, Any] = {"run_name": run_name, "run_id": run_id, "wall_time_s": wall,
                               "fit_start_time": sinks.fit_start_time, "total_steps": total,
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
    console = setup_console(run_dir, route_workers=False)  # framework noise -> <run>/logs/framework.log
    try:
        init_ray(cfg)  # Ray's start-up notices go to the file too
        console.route_ray_workers()
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
