"""The per-worker training loop: the only place DeepSpeed runs.

Each optimizer step (ARCHITECTURE.md "worker"):

1. every rank takes ``grad_accum`` micro-batches of exactly ``micro_batch_size`` pairs from its Ray
   Data shard (:func:`epoch_micro_batches`); one MIN all-reduce tells every rank whether all ranks
   have a full step (equal step counts are *enforced*, so a short shard ends the epoch on every rank
   together instead of hanging a collective);
2. per micro-batch: one concatenated chosen+rejected forward of the policy, the reference log-probs
   (precomputed columns, or an online reference pass), the configured loss at the current lambda,
   ``engine.backward`` / ``engine.step``; per-category violation statistics ``(n, v)`` and the
   logging sums accumulate exactly; with ``dual.violation=generation|blend`` every
   ``dual.generation_every`` steps the policy's own sampled answers are judged (:mod:`.onpolicy`);
3. one SUM all-reduce of ``[n | v | sums]`` (float64) across ranks;
4. rank 0 sends the global ``(n, v)`` and the metrics row to the MarginController actor, gets
   the new lambda, and broadcasts it; every ``dual.check_every`` steps an all-gather checks that
   every rank holds bit-identical lambda (checked, not assumed);
5. every ``checkpoint_every`` steps and at the end, every rank saves its DeepSpeed shard with the
   dual state, step and config (:mod:`.checkpointing`), then every rank calls ``ray.train.report``;
   at the end the model is exported layer group by layer group straight into the run's ``final/``.

Resume (one contract, :mod:`.checkpointing` + :mod:`.resume`): the step, lambda, window, optimizer,
scheduler, data position and sinks all come from the same verified checkpoint, or the run refuses.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch

from catdpo_ray.config import RunConfig, from_dict
from catdpo_ray.data.batching import batch_token_counts
from catdpo_ray.data.tables import train_shard_name
from catdpo_ray.data.tokenize import ray_collate, response_start_id
from catdpo_ray.losses import LossParams, compute_loss
from catdpo_ray.train import checkpointing as C
from catdpo_ray.train import dist as D
from catdpo_ray.train.controller import ControllerLink
from catdpo_ray.train.faults import maybe_fail
from catdpo_ray.train.heldout import heldout_eval

# Kept importable from here for tests and benchmarks written against the earlier layout.
from catdpo_ray.train.localgroup import init_local_group as _init_local_process_group  # noqa: E402,F401
from catdpo_ray.train.localgroup import release_local_group as _release_local_process_group  # noqa: E402,F401
from catdpo_ray.train.models import Models, preference_batch
from catdpo_ray.train.onpolicy import offline_signal
from catdpo_ray.train.startup import StartupClock
from catdpo_ray.train.stepstats import SCALARS, micro_stats, step_row
from catdpo_ray.train.stepstats import digest as _digest  # noqa: E402,F401


class SimulatedInterruption(RuntimeError):
    """Raised on every rank after the checkpoint at ``train.stop_after_step`` (resume tests)."""


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker entry point. ``loop_config``: ``config`` (dict), ``plan`` (dict), ``controller``."""
    from catdpo_ray.train.localgroup import local_process_group
    from catdpo_ray.train.modeling import import_deepspeed_in_worker

    cfg = from_dict(loop_config["config"])
    clock = StartupClock(own_process=cfg.scaling.num_workers != 0)
    if cfg.scaling.num_workers != 0:
        import_deepspeed_in_worker()  # a worker process of its own: skip DeepSpeed's mlflow import
        clock.mark("import")
        _train(cfg, loop_config["plan"], loop_config["controller"], clock)
        return
    with local_process_group():
        clock.mark("import")
        _train(cfg, loop_config["plan"], loop_config["controller"], clock)


def _threads(cfg: RunConfig) -> int:
    """Torch threads of this worker: its CPU share; local mode (in-process) gets every core."""
    if cfg.scaling.num_workers == 0:
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    return max(1, int(cfg.scaling.cpus_per_worker))


def epoch_micro_batches(shard: Any, cfg: RunConfig, epoch: int, rank: int, collate: Callable[[dict[str, Any]], Any], *,
                        skip: int) -> tuple[Iterator[dict[str, torch.Tensor]], Any]:
    """This rank's micro-batches of one epoch, each of exactly ``micro_batch_size`` pairs, the first
    ``skip`` left out uncollated (the exact data position on resume).

    Every epoch reshuffles within a local buffer (on top of the driver's shuffle of the whole split),
    seeded by (seed, epoch, rank), so a resumed run replays the same order. Ray's shuffle buffer can
    emit short batches mid-stream (ray#66085); :class:`~catdpo_ray.data.batching.ExactMicroBatches`
    re-chunks the rows so every micro-batch (and so every optimizer step) weighs every pair equally.
    With ``train.length_grouping`` rows are sorted by length within windows of that many micro-batches.

    Returns:
        ``(iterator of collated micro-batches, the ExactMicroBatches)`` (its ``dropped_rows`` after the epoch).
    """
    from catdpo_ray.data.batching import micro_batch_stream

    t = cfg.train
    seed = t.seed * 100_003 + epoch * 1_009 + rank
    shuffle = {"local_shuffle_buffer_size": t.shuffle_buffer, "local_shuffle_seed": seed} if t.shuffle else {}
    rows = shard.iter_batches(batch_size=t.micro_batch_size, batch_format="numpy", **shuffle)
    return micro_batch_stream(rows, micro_batch_size=t.micro_batch_size, collate_fn=collate, skip=skip,
                              length_window=t.length_grouping, seed=seed)


def _train_collate(cfg: RunConfig, models: Models, pad_id: int, bos_id: int | None, need_mi: bool) -> tuple[Any, bool]:
    """The training collate: padding-free packing where the attention implementation isolates packed
    sequences (``train.packing``), else padding. Returns ``(collate, packed)``."""
    from catdpo_ray.data.batching import collate_packed, packs_into_one_row, supports_packing
    from catdpo_ray.data.tokenize import PairCollate

    config = models.engine.module.config
    can_pack = supports_packing(config)
    if cfg.train.packing == "on" and not can_pack:
        raise ValueError(f"train.packing=on: attention implementation {getattr(config, '_attn_implementation', None)!r} "
                         "does not isolate packed sequences; use train.packing=auto or off")
    if cfg.train.packing == "off" or not can_pack:
        return PairCollate(pad_id=pad_id, bos_id=bos_id, with_response_only=need_mi), False
    return partial(collate_packed, pad_id=pad_id, bos_id=bos_id, with_response_only=need_mi, row_tokens=cfg.data.max_length,
                   one_row=packs_into_one_row(config)), True


def _take(it: Iterator[dict[str, torch.Tensor]], n: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


def _dual_tensor(current: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(list(current["lambdas"]) + list(current["binding"]), dtype=torch.float64)


def _train(cfg: RunConfig, plan: dict[str, Any], controller: Any, clock: StartupClock) -> None:
    """The loop itself (module docstring); runs on every rank. ``clock``: this start's phase marks."""
    import ray.train
    import ray.train.torch

    from catdpo_ray.train.console import quiet_worker

    quiet_worker()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    if not cfg.scaling.use_gpu:
        torch.set_num_threads(_threads(cfg))
    world, rank = D.world_size(), D.rank()
    is_rank0 = rank == 0
    torch.manual_seed(cfg.train.seed)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(plan["tokenizer_path"], trust_remote_code=cfg.model.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    clock.mark("tokenizer")
    need_mi = cfg.loss.name == "bdpo"
    # The held-out evaluation needs no mutual information: its batches carry no response-only pass.
    collate = ray_collate(pad_id=pad_id)
    total_steps, steps_per_epoch = plan["total_steps"], plan["steps_per_epoch"]
    C.clean_stale_staging(plan, rank)
    models = Models(cfg, plan["model_path"], world, total_steps)
    engine = models.engine
    clock.mark("model_and_engine")
    k = cfg.num_categories
    params = LossParams(beta=cfg.loss.beta, label_smoothing=cfg.loss.label_smoothing, delta=cfg.loss.delta,
                        simpo_gamma=cfg.loss.simpo_gamma, bdpo_tau=cfg.loss.bdpo_tau, agg=cfg.dual.agg)
    link = ControllerLink(controller) if is_rank0 else None

    # ---- resume: one contract, checked in one place ----
    restored = C.restore(engine, cfg, plan, device)
    step = restored.step
    if link is not None:
        current = link.begin(restored.dual_state, step, restored.info)
        dual = _dual_tensor(current)
    else:
        dual = torch.zeros(2 * k, dtype=torch.float64)
    dual = D.broadcast(dual, device)
    clock.mark("restore")
    startup_pending = restored.step < total_steps  # the startup row goes out after this start's first step

    onpolicy = None
    if cfg.dual.violation in ("generation", "blend"):
        from catdpo_ray.train.onpolicy import OnPolicySignal

        onpolicy = OnPolicySignal(cfg, plan, tokenizer, device, world=world, rank=rank)
        if "onpolicy" in restored.extra:
            onpolicy.load_state_dict(restored.extra["onpolicy"])

    def extra_state() -> dict[str, Any]:
        return {"onpolicy": onpolicy.state_dict()} if onpolicy is not None else {}

    def run_eval(at_step: int) -> dict[str, Any]:
        """Held-out preference accuracy (policy, reference, implicit reward); numeric keys for Ray/Tune."""
        # No gradients are kept here, so batches 4x the training micro-batch fit wherever training does.
        ev = heldout_eval(models, ray.train.get_dataset_shard("test"), collate, batch_size=4 * cfg.train.micro_batch_size,
                          num_rows=plan["num_test_pairs"], categories=list(cfg.data.categories), beta=cfg.loss.beta,
                          lambdas=dual[:k], binding=dual[k:], device=device)
        if link is not None:
            link.record({"kind": "eval", "step": at_step, **ev})
        return {key: val for key, val in ev.items() if isinstance(val, (int, float))}

    # ---- train ----
    epoch = step // steps_per_epoch
    last_saved = step if restored.from_checkpoint else -1
    check_every = cfg.dual.check_every
    offline = offline_signal(cfg.dual.violation, cfg.dual.blend_offline)
    if models.mode == "none" and offline in ("soft", "hard"):
        offline = "likelihood"  # reference-free losses (SimPO) have no lambda; the logged rate needs no reference
    # B-DPO's response-only reference pass runs here only with an online reference (precomputed: columns).
    online_mi = need_mi and models.mode == "online"
    train_collate, packed = _train_collate(cfg, models, pad_id, response_start_id(tokenizer) if online_mi else None,
                                           online_mi)
    while step < total_steps:
        it, exact = epoch_micro_batches(ray.train.get_dataset_shard(train_shard_name(rank)), cfg, epoch, rank, train_collate,
                                        skip=(step - epoch * steps_per_epoch) * cfg.train.grad_accum)
        epoch_start = step
        while step < min(total_steps, (epoch + 1) * steps_per_epoch):
            t0 = time.perf_counter()
            micro = _take(it, cfg.train.grad_accum)
            if startup_pending:
                clock.mark("first_batch")
            full = D.all_reduce(torch.tensor([1.0 if len(micro) == cfg.train.grad_accum else 0.0]), device, op="min")
            if full.item() == 0:
                break  # some rank's shard ran short: every rank ends the epoch here, together
            gathered = None
            if step % check_every == 0:
                gathered = D.all_gather(dual[:k], device)
                if not all(torch.equal(gathered[0], g) for g in gathered):
                    raise RuntimeError(f"lambda differs across ranks at step {step}: {gathered.tolist()}")
            stats = torch.zeros(2 * k + len(SCALARS), dtype=torch.float64)
            for mb in micro:
                b = {key: v.to(device) for key, v in mb.items()}
                pb = preference_batch(models, b, dual[:k], dual[k:], with_grad=True, need_mi=need_mi)
                out = compute_loss(cfg.loss.name, pb, params)
                engine.backward(out.losses.mean())  # every micro-batch holds exactly micro_batch_size pairs
                engine.step()
                stats += micro_stats(pb, out, *batch_token_counts(b), beta=cfg.loss.beta, signal=offline)
            if onpolicy is not None:
                onpolicy.apply(engine, stats, k, step + 1)  # replaces/blends (n, v) every generation_every steps
            glob = D.all_reduce(stats, device)
            step += 1
            if link is not None:
                row = step_row(glob, k, time.perf_counter() - t0, step, epoch, float(engine.get_lr()[0]), world, gathered,
                               list(cfg.data.categories))
                if device.type == "cuda":  # rank 0's peak, for `catdpo-ray plan` vs measured (gpu_check)
                    row["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                if onpolicy is not None:
                    row.update(onpolicy.row_fields())
                dual = _dual_tensor(link.step(step, glob[:k].tolist(), glob[k : 2 * k].tolist(), row))
            dual = D.broadcast(dual, device)
            if startup_pending:
                clock.mark("first_step")
                startup_pending = False
                if link is not None:
                    link.record(clock.row(restored.step))
            if onpolicy is not None and link is not None:
                onpolicy.flush(link, step)
            maybe_fail(plan, "step", step, rank, local=cfg.scaling.num_workers == 0)
            if step == total_steps:
                break  # the final evaluation and checkpoint follow the loop
            metrics: dict[str, Any] = {"step": step}
            if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                metrics.update(run_eval(step))
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                C.save(engine, cfg, plan, link, step, metrics, final=False, extra=extra_state())
                last_saved = step
            elif len(metrics) > 1:
                ray.train.report(metrics)
            if cfg.train.stop_after_step is not None and step >= cfg.train.stop_after_step and last_saved == step:
                raise SimulatedInterruption(f"stopped after the checkpoint at step {step} (train.stop_after_step)")
        epoch += 1
        if step == epoch_start and step < total_steps:
            if link is not None:
                link.record({"kind": "warning", "step": step, "message": "no full step left in the data"})
            break
    # Resumed from the run's own final checkpoint (e.g. killed during the export): its final evaluation and
    # checkpoint are done and logged; only the export is left. Anything else ends with both, as usual.
    if not (restored.final and step == total_steps and restored.step == total_steps):
        metrics = {"step": step}
        if cfg.train.eval_before_after:
            metrics.update(run_eval(step))
        C.save(engine, cfg, plan, link, step, metrics, final=True, extra=extra_state())
    if cfg.output.save_final:
        C.export_final(models, cfg, plan, tokenizer, device)
