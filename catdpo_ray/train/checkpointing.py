"""Checkpoints: save (every rank), verify, choose, restore -- the one place resume is decided.

Layout of one checkpoint directory (``checkpoint_<step:06d>``, in Ray's storage, or for Ray Train
local mode in ``<storage>/<run>/local_checkpoints``): DeepSpeed's files under ``ckpt/``, rank 0's
``catdpo_state.json`` (step, dual state by category name, the config it was trained with, the run
id, steps per epoch), and one integrity manifest per rank (:mod:`.integrity`), written last.

Restore (:func:`restore`) considers every checkpoint of this run, newest first: Ray's registered one
and any complete one in the run's storage folder (Ray registers a reported checkpoint
asynchronously, so the newest on disk may be unknown to it: RAY_DEEPSPEED_NOTES.md pitfall 15).
Each rank verifies its own files; the ranks agree with one MIN all-reduce; a damaged or foreign
checkpoint is skipped and the next older one used, and the run says so. The chosen checkpoint's
config must agree with this run's on every key that is not resumable (:mod:`.resume`), or every
rank refuses together. DeepSpeed's files are loaded under :func:`.integrity.safe_torch_load`
(``weights_only=True`` with an explicit allow-list), never by unpickling arbitrary objects.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from catdpo_ray.config import RunConfig
from catdpo_ray.train import dist as D
from catdpo_ray.train.faults import maybe_fail
from catdpo_ray.train.sinks import atomic_write_text

CKPT_TAG = "ckpt"
STATE_FILE = "catdpo_state.json"
STAGING_PREFIX = "catdpo-ckpt-"
RNG_FILE = "rng_rank{rank}.pt"


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class Restored:
    """What the workers resumed from (identical on every rank, except ``dual_state`` on rank > 0)."""

    step: int = 0
    dual_state: dict[str, Any] | None = None
    from_checkpoint: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    #: Worker-side state saved beside the dual state (e.g. the on-policy signal's held rates), every rank.
    extra: dict[str, Any] = field(default_factory=dict)
    #: The checkpoint is a run's final one (its final evaluation and checkpoint rows are already logged).
    final: bool = False


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:06d}"


def _state(d: Path) -> dict[str, Any] | None:
    try:
        return json.loads((d / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _staging_root() -> Path:
    return Path(tempfile.gettempdir())


def clean_stale_staging(plan: dict[str, Any], rank: int) -> None:
    """Remove this run's staging folders left by a killed worker on this node (never another run's),
    and local mode's half-written ``.partial`` / ``.old`` checkpoint folders."""
    for stale in _staging_root().glob(f"{STAGING_PREFIX}{plan['run_id']}-r{rank}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if rank == 0:
        local = Path(plan["local_checkpoint_dir"])
        for stale in list(local.glob("checkpoint_*.partial")) + list(local.glob("checkpoint_*.old")):
            shutil.rmtree(stale, ignore_errors=True)


def _candidates(cfg: RunConfig, plan: dict[str, Any]) -> list[Path]:
    """This run's checkpoint folders, newest step first (verification decides which are usable)."""
    import ray.train

    found: dict[str, Path] = {}
    roots = [Path(plan["local_checkpoint_dir"])] if cfg.scaling.num_workers == 0 else []
    if cfg.scaling.num_workers != 0 and plan.get("storage_run_dir"):
        roots.append(Path(plan["storage_run_dir"]))
    for root in roots:
        for d in root.glob("checkpoint_*"):
            if d.is_dir() and not d.name.endswith((".partial", ".old")):
                found[str(d.resolve())] = d
    registered = ray.train.get_checkpoint()
    if registered is not None and "://" not in registered.path:
        found.setdefault(str(Path(registered.path).resolve()), Path(registered.path))
    elif registered is not None:
        # URI storage (s3://, gs://): only Ray's registered checkpoint is considered; it is downloaded.
        local = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{plan['run_id']}-r{D.rank()}-dl-"))
        registered.to_directory(str(local))
        found[str(local)] = local

    def key(d: Path) -> tuple[int, str]:
        state = _state(d)
        return (int(state["step"]) if state and "step" in state else -1, d.name)

    return sorted(found.values(), key=key, reverse=True)


def restore(engine: Any, cfg: RunConfig, plan: dict[str, Any], device: torch.device) -> Restored:
    """Load the newest good checkpoint of this run on every rank, or start from step 0.

    Collective: every rank calls it. Raises :class:`catdpo_ray.train.resume.ResumeRefused` (on every
    rank) when the checkpoint's config differs from this run's on a key that may not change.
    """
    from catdpo_ray.train.integrity import safe_torch_load, verify_checkpoint
    from catdpo_ray.train.resume import check_resume

    rank = D.rank()
    rejected: list[str] = []
    chosen: Path | None = None
    for d in _candidates(cfg, plan):
        result = verify_checkpoint(d, run_id=plan["run_id"], ranks=[rank])  # each rank hashes its own files
        ok, reason = result.ok, result.reason
        flags = D.all_gather(torch.tensor([1.0 if ok else 0.0]), device).flatten().tolist()
        if all(f == 1.0 for f in flags):
            chosen = d
            break
        bad = [r for r, f in enumerate(flags) if f != 1.0]
        rejected.append(f"{d.name}: failed verification on rank(s) {bad}" + (f" ({reason})" if not ok else ""))
    if chosen is None:
        return Restored(info={"rejected_checkpoints": rejected} if rejected else {})
    state = _state(chosen)
    assert state is not None  # verified: the state file is in rank 0's manifest
    check_resume(state["config"], cfg.to_dict())
    if state["steps_per_epoch"] != plan["steps_per_epoch"] or state.get("num_train_pairs") != plan["num_train_pairs"]:
        from catdpo_ray.train.resume import ResumeRefused

        raise ResumeRefused(
            f"run {plan['run_name']!r}: the checkpoint at step {state['step']} was trained on {state.get('num_train_pairs')} "
            f"pairs ({state['steps_per_epoch']} steps per epoch); the data now give {plan['num_train_pairs']} pairs "
            f"({plan['steps_per_epoch']} steps per epoch), so the data position cannot be restored. Same name = resume "
            "the same run: choose another output.name")
    with safe_torch_load():
        engine.load_checkpoint(str(chosen), tag=CKPT_TAG)
        rng = chosen / RNG_FILE.format(rank=rank)
        if rng.exists():
            _set_rng_state(torch.load(rng, weights_only=True))
    info = {"checkpoint": chosen.name, "engine_global_steps": int(engine.global_steps),
            "optimizer_steps": _optimizer_steps(engine), "lr": float(engine.get_lr()[0])}
    if rejected:
        info["rejected_checkpoints"] = rejected
    return Restored(step=int(state["step"]), dual_state=state["dual"] if rank == 0 else None, from_checkpoint=True,
                    info=info, extra=state.get("extra", {}), final=bool(state.get("final")))


def _optimizer_steps(engine: Any) -> float:
    """Largest Adam ``step`` in the (inner) torch optimizer state: > 0 iff optimizer state was restored."""
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    steps = [float(st["step"]) for st in getattr(opt, "state", {}).values() if isinstance(st, dict) and "step" in st]
    return max(steps) if steps else 0.0


def _local_checkpoints(root: Path) -> list[Path]:
    """Local-mode ``checkpoint_<step>`` directories, oldest first (``.partial`` / ``.old`` ones excluded)."""
    return sorted(d for d in root.glob("checkpoint_*") if d.name.removeprefix("checkpoint_").isdigit())


def save(engine: Any, cfg: RunConfig, plan: dict[str, Any], link: Any, step: int, metrics: dict[str, Any], *,
         final: bool, extra: dict[str, Any] | None = None) -> None:
    """Every rank saves its shard and its manifest (rank 0 adds the state), then all report.

    Ray-managed workers stage under the system temp dir and Ray copies the staged folder into the run's
    storage (SYNC upload) as ``checkpoint_<step>``; the staged copy is removed afterwards. Local mode
    persists nothing itself, so there the checkpoint is written beside the previous one in the run's
    storage and renamed into place: a crash mid-save never destroys a complete checkpoint.
    """
    import ray.train

    from catdpo_ray.train.integrity import write_manifest

    rank, world = D.rank(), D.world_size()
    local = cfg.scaling.num_workers == 0
    if local:
        target = Path(plan["local_checkpoint_dir"]) / checkpoint_name(step)
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{plan['run_id']}-r{rank}-{step}-", dir=_staging_root()))
    try:
        engine.save_checkpoint(str(tmp), tag=CKPT_TAG, client_state={"catdpo_step": step})
        # Each rank's RNG state (dropout, LoRA dropout, sampling): DeepSpeed does not save it.
        torch.save(_rng_state(), tmp / RNG_FILE.format(rank=rank))
        maybe_fail(plan, "ckpt_write", step, rank, local=local)
        if rank == 0:
            state = {"step": step, "dual": link.state_dict(), "categories": list(cfg.data.categories),
                     "steps_per_epoch": plan["steps_per_epoch"], "num_train_pairs": plan["num_train_pairs"],
                     "run": plan["run_name"], "run_id": plan["run_id"], "config": cfg.to_dict(), "final": final,
                     "extra": extra or {}}
            atomic_write_text(tmp / STATE_FILE, json.dumps(state))
        write_manifest(tmp, run_id=plan["run_id"], step=step, rank=rank, world_size=world, extra={"tag": CKPT_TAG})
        D.barrier()
        if local:
            old = target.with_name(target.name + ".old")
            if target.exists():
                target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
            tmp = target
        ray.train.report({**metrics, "checkpoint_step": step}, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                         checkpoint_dir_name=checkpoint_name(step),
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.SYNC)
    finally:
        if not local:
            shutil.rmtree(tmp, ignore_errors=True)
    maybe_fail(plan, "ckpt_done", step, rank, local=local)
    if local:
        for old_ckpt in _local_checkpoints(tmp.parent)[: -max(1, cfg.output.num_checkpoints_to_keep)]:
            shutil.rmtree(old_ckpt, ignore_errors=True)
    if link is not None:
        link.record({"kind": "checkpoint", "step": step, "final": final})


def export_final(models: Any, cfg: RunConfig, plan: dict[str, Any], tokenizer: Any, device: torch.device) -> None:
    """Collective: the final model, gathered a few layers at a time, straight into the run's ``final/``."""
    from catdpo_ray.train.export import export_hf_model

    final = Path(plan["final_dir"])
    # Rank 0 writes final/ itself: the run directory must be visible to it (shared storage on multi-node).
    visible = torch.tensor([1.0 if final.parent.joinpath("run.json").exists() or D.rank() != 0 else 0.0])
    if D.all_reduce(visible, device, op="min").item() == 0:
        raise RuntimeError(f"rank 0 cannot see the run directory {final.parent} on its node: put output.dir on "
                           "storage every node mounts (the final model is written there directly)")
    module = models.engine.module
    base_config = module.base_model.model.config if models.lora else module.config
    export_hf_model(module, out_dir=final, model_config=base_config, tokenizer=tokenizer,
                    zero3=cfg.train.zero_stage == 3, lora_scaling=(cfg.model.lora.alpha / cfg.model.lora.r) if models.lora else None,
                    is_rank0=D.rank() == 0, max_shard_size=cfg.output.max_shard_size)
    D.barrier()
