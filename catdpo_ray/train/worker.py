"""The per-worker training loop: the only place DeepSpeed runs.

Each optimizer step (ARCHITECTURE.md "worker"):

1. every rank takes ``grad_accum`` micro-batches from its Ray Data shard; one MIN all-reduce
   tells every rank whether all ranks have a full step (equal step counts are *enforced*, so a
   short shard ends the epoch on every rank together instead of hanging a collective);
2. per micro-batch: one concatenated chosen+rejected forward of policy and reference, sequence
   log-probs, the configured loss at the current lambda, ``engine.backward`` / ``engine.step``;
   per-category violation statistics ``(n, v)`` and the logging sums accumulate exactly;
3. one SUM all-reduce of ``[n | v | sums]`` (float64) across ranks;
4. rank 0 sends the global ``(n, v)`` and the metrics row to the MarginController actor, gets
   the new lambda, and broadcasts it; at the start of the next step an all-gather checks that
   every rank holds bit-identical lambda (checked, not assumed);
5. every ``checkpoint_every`` steps and at the end, every rank saves its DeepSpeed shard with the
   dual state, step and data position, then every rank calls ``ray.train.report``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch

from catdpo_ray.config import RunConfig, from_dict
from catdpo_ray.data.tokenize import ray_collate
from catdpo_ray.eval.preference import EvalAccumulator, eval_row
from catdpo_ray.losses import (
    LossParams,
    PreferenceBatch,
    compute_loss,
    mutual_information,
    sequence_logps,
    violation_stats,
)
from catdpo_ray.train import dist as D
from catdpo_ray.train.ds_config import build_ds_config, build_reference_ds_config, lr_multiplier, use_torch_optimizer
from catdpo_ray.train.modeling import (
    apply_lora,
    gather_state_dict,
    load_causal_lm,
    merge_lora_state_dict,
    save_hf_model,
)

#: Scalar sums that follow the 2K per-category entries of the step statistics vector.
SCALARS = ("loss_sum", "pairs", "acc_sum", "margin_sum", "chosen_reward_sum", "rejected_reward_sum", "tokens",
           "dpo_loss_sum")
CKPT_TAG = "ckpt"
STATE_FILE = "catdpo_state.json"


class SimulatedInterruption(RuntimeError):
    """Raised on every rank after the checkpoint at ``train.stop_after_step`` (resume tests)."""


def _init_local_process_group() -> None:
    """Ray Train local mode has no process group; DeepSpeed needs one: a 1-rank gloo group."""
    import torch.distributed as dist

    _release_local_process_group()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    dist.init_process_group("gloo", rank=0, world_size=1)


def _release_local_process_group() -> None:
    """Tear down a local-mode group and DeepSpeed's cached view of it, so that a later local run
    in the same process (tests, sweeps in local mode) starts from a clean slate."""
    import deepspeed.comm as ds_comm
    import torch.distributed as dist

    if dist.is_initialized():
        ds_comm.destroy_process_group() if ds_comm.comm.cdb is not None else dist.destroy_process_group()
    ds_comm.comm.cdb = None


class Models:
    """Policy engine + reference log-probs (frozen engine, or LoRA with the adapter disabled)."""

    def __init__(self, cfg: RunConfig, model_path: str, world: int, total_steps: int) -> None:
        import deepspeed

        self.cfg = cfg
        # Bind DeepSpeed's comm layer to Ray Train's process group now: zero.Init (ZeRO-3 loading)
        # reads the world size before deepspeed.initialize would otherwise do this.
        deepspeed.init_distributed(dist_backend="nccl" if cfg.scaling.use_gpu else "gloo")
        ds_cfg = build_ds_config(cfg, world_size=world)
        self._hf_ds = None
        if cfg.train.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds = HfDeepSpeedConfig(ds_cfg)  # must stay alive while models load (zero.Init)
        policy = load_causal_lm(cfg, model_path)
        if cfg.model.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
        self.lora = cfg.model.lora.enabled
        if self.lora:
            policy = apply_lora(cfg, policy)
        params = [p for p in policy.parameters() if p.requires_grad]
        t = cfg.train
        optimizer = (
            torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.95))
            if use_torch_optimizer(cfg)
            else None
        )
        schedule = partial(
            lr_multiplier, total_steps=total_steps, warmup_ratio=t.warmup_ratio, schedule=t.lr_schedule, min_ratio=t.min_lr_ratio
        )
        self.engine, _, _, _ = deepspeed.initialize(
            model=policy,
            model_parameters=params,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=ds_cfg,
        )
        self.ref_engine = None
        if not self.lora:
            ref = load_causal_lm(cfg, model_path)
            ref.requires_grad_(False)
            self.ref_engine, *_ = deepspeed.initialize(model=ref, config=build_reference_ds_config(cfg, world_size=world))
            self.ref_engine.eval()

    @staticmethod
    def _logps(model: Any, ids: torch.Tensor, attn: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        return sequence_logps(logits, ids, mask)

    def policy_logps(self, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._logps(self.engine, b["input_ids"], b["attention_mask"], b["loss_mask"])

    @torch.no_grad()
    def reference_logps(self, b: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
        ids, attn, mask = b[prefix + "input_ids"], b[prefix + "attention_mask"], b[prefix + "loss_mask"]
        if self.ref_engine is not None:
            return self._logps(self.ref_engine, ids, attn, mask)[0]
        with self.engine.module.disable_adapter():
            return self._logps(self.engine, ids, attn, mask)[0]


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def preference_batch(models: Models, b: dict[str, torch.Tensor], lambdas: torch.Tensor, binding: torch.Tensor,
                     *, with_grad: bool, need_mi: bool) -> PreferenceBatch:
    """Policy and reference log-probs of one micro-batch as a :class:`PreferenceBatch`."""
    bsz = b["safety_gap"].shape[0]
    with torch.set_grad_enabled(with_grad):
        pol, counts = models.policy_logps(b)
    ref = models.reference_logps(b)
    mi_c = mi_r = None
    if need_mi:
        # B-DPO mutual information: log p_ref(y|x) - log p_ref(y) per token (METHOD.md section 5).
        ref_resp = models.reference_logps(b, prefix="resp_")
        mi = mutual_information(ref, ref_resp, counts.clamp(min=1))
        mi_c, mi_r = mi[:bsz], mi[bsz:]
    return PreferenceBatch(
        policy_chosen_logps=pol[:bsz], policy_rejected_logps=pol[bsz:],
        chosen_tokens=counts[:bsz], rejected_tokens=counts[bsz:],
        ref_chosen_logps=ref[:bsz], ref_rejected_logps=ref[bsz:],
        safety_gap=b["safety_gap"], category_mask=b["category_mask"],
        lambdas=lambdas.to(pol.device), binding=binding.to(pol.device).bool(),
        mi_chosen=mi_c, mi_rejected=mi_r,
    )


def _take(it: Iterator[dict[str, torch.Tensor]], n: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.to(torch.float64).numpy().tobytes()).hexdigest()[:16]


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker entry point. ``loop_config``: ``config`` (dict), ``plan`` (dict), ``controller``."""
    cfg = from_dict(loop_config["config"])
    if cfg.scaling.num_workers != 0:
        _train(cfg, loop_config["plan"], loop_config["controller"])
        return
    _init_local_process_group()
    try:
        _train(cfg, loop_config["plan"], loop_config["controller"])
    finally:
        _release_local_process_group()


def _train(cfg: RunConfig, plan: dict[str, Any], controller: Any) -> None:
    """The loop itself (module docstring); runs on every rank."""
    import ray
    import ray.train
    import ray.train.torch

    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    if not cfg.scaling.use_gpu:
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    world, rank = D.world_size(), D.rank()
    is_rank0 = rank == 0
    torch.manual_seed(cfg.train.seed)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(plan["tokenizer_path"], trust_remote_code=cfg.model.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    need_mi = cfg.loss.name == "bdpo"
    collate: Callable[[dict[str, Any]], dict[str, torch.Tensor]] = ray_collate(
        pad_id=pad_id, bos_id=tokenizer.bos_token_id, with_response_only=need_mi
    )
    total_steps, steps_per_epoch = plan["total_steps"], plan["steps_per_epoch"]
    models = Models(cfg, plan["model_path"], world, total_steps)
    engine = models.engine
    k = cfg.num_categories
    params = LossParams(beta=cfg.loss.beta, label_smoothing=cfg.loss.label_smoothing, delta=cfg.loss.delta,
                        simpo_gamma=cfg.loss.simpo_gamma, bdpo_tau=cfg.loss.bdpo_tau, agg=cfg.dual.agg)

    # ---- resume ----
    step = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and cfg.scaling.num_workers == 0:  # local mode: Ray restores nothing; our own copies
        ckpt = _latest_local_checkpoint(Path(plan["local_checkpoint_dir"]))
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = json.loads((Path(d) / STATE_FILE).read_text())
            if state["steps_per_epoch"] != steps_per_epoch:  # same on every rank: all raise together
                raise ValueError(
                    f"run {plan['run_name']!r} already has a checkpoint (step {state['step']}) from a run with "
                    f"{state['steps_per_epoch']} steps per epoch; this config gives {steps_per_epoch}, so the data "
                    "position cannot be restored. Same name = resume the same run: choose another output.name")
            engine.load_checkpoint(d, tag=CKPT_TAG)
        step = int(state["step"])
        if is_rank0:
            restored = {"engine_global_steps": int(engine.global_steps), "optimizer_steps": _optimizer_steps(engine),
                        "lr": float(engine.get_lr()[0])}
            ray.get(controller.restore.remote(state["dual"], step, restored))
    dual = torch.tensor(_flatten(ray.get(controller.current.remote())) if is_rank0 else [0.0] * (2 * k), dtype=torch.float64)
    dual = D.broadcast(dual, device)

    def run_eval(at_step: int) -> dict[str, Any]:
        """Held-out preference accuracy (policy, reference, implicit reward); numeric keys for Ray/Tune."""
        acc = EvalAccumulator(k)
        shard = ray.train.get_dataset_shard("test")
        it = iter(shard.iter_torch_batches(batch_size=cfg.train.micro_batch_size, drop_last=False, collate_fn=collate))
        engine.eval()
        dummy = None
        while True:
            batch = next(it, None)
            has = D.all_reduce(torch.tensor([0.0 if batch is None else 1.0]), device, op="max")
            if has.item() == 0:
                break  # every rank is out of data: all leave together
            weight = 1.0 if batch is not None else 0.0
            batch = batch if batch is not None else dummy  # ranks out of data still join ZeRO-3 gathers
            dummy = batch
            with torch.no_grad():
                if batch is None:  # this rank never had a test batch: nothing to forward
                    raise RuntimeError("test shard empty on one rank; use more test rows than workers")
                pb = preference_batch(models, _to(batch, device), dual[:k], dual[k:], with_grad=False, need_mi=False)
                acc.add(pb, batch["chosen_safe"].to(device), batch["rejected_safe"].to(device), beta=cfg.loss.beta, weight=weight)
        engine.train()
        ev = eval_row(D.all_reduce(acc.totals, device), cfg.data.categories)
        if is_rank0:
            ray.get(controller.record.remote({"kind": "eval", "step": at_step, **ev}))
        return {key: val for key, val in ev.items() if isinstance(val, (int, float))}

    # ---- train ----
    epoch = step // steps_per_epoch
    last_saved = step if ckpt is not None else -1
    while step < total_steps:
        shard = ray.train.get_dataset_shard("train")
        # Every epoch reshuffles within a local buffer (on top of the driver's shuffle of the whole split),
        # seeded by (seed, epoch, rank) so that a resumed run replays the same order and skips the same pairs.
        shuffle = ({"local_shuffle_buffer_size": cfg.train.shuffle_buffer,
                    "local_shuffle_seed": cfg.train.seed * 100_003 + epoch * 1_009 + rank} if cfg.train.shuffle else {})
        it = iter(shard.iter_torch_batches(batch_size=cfg.train.micro_batch_size, drop_last=True, collate_fn=collate,
                                           **shuffle))
        _take(it, (step - epoch * steps_per_epoch) * cfg.train.grad_accum)  # data position on resume
        epoch_start = step
        while step < min(total_steps, (epoch + 1) * steps_per_epoch):
            t0 = time.perf_counter()
            micro = _take(it, cfg.train.grad_accum)
            full = D.all_reduce(torch.tensor([1.0 if len(micro) == cfg.train.grad_accum else 0.0]), device, op="min")
            if full.item() == 0:
                break  # some rank's shard ran short: every rank ends the epoch here, together
            gathered = D.all_gather(dual[:k], device)
            if not all(torch.equal(gathered[0], g) for g in gathered):
                raise RuntimeError(f"lambda differs across ranks at step {step}: {gathered.tolist()}")
            stats = torch.zeros(2 * k + len(SCALARS), dtype=torch.float64)
            for mb in micro:
                b = _to(mb, device)
                pb = preference_batch(models, b, dual[:k], dual[k:], with_grad=True, need_mi=need_mi)
                out = compute_loss(cfg.loss.name, pb, params)
                engine.backward(out.losses.mean())
                engine.step()
                stats += _micro_stats(pb, out, b, cfg)
            glob = D.all_reduce(stats, device)
            step += 1
            if is_rank0:
                row = _step_row(glob, k, time.perf_counter() - t0, step, epoch, engine, world, gathered, cfg.data.categories)
                new = ray.get(controller.step.remote(step, glob[:k].tolist(), glob[k : 2 * k].tolist(), row))
                dual = torch.tensor(_flatten(new), dtype=torch.float64)
            dual = D.broadcast(dual, device)
            if step == total_steps:
                break  # the final evaluation and checkpoint follow the loop
            metrics: dict[str, Any] = {"step": step}
            if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                metrics.update(run_eval(step))
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                _checkpoint(engine, models, cfg, plan, tokenizer, controller, step, metrics, final=False)
                last_saved = step
            elif len(metrics) > 1:
                ray.train.report(metrics)
            if cfg.train.stop_after_step is not None and step >= cfg.train.stop_after_step and last_saved == step:
                raise SimulatedInterruption(f"stopped after the checkpoint at step {step} (train.stop_after_step)")
        epoch += 1
        if step == epoch_start and step < total_steps:
            if is_rank0:
                ray.get(controller.record.remote({"kind": "warning", "step": step, "message": "no full step left in the data"}))
            break
    metrics = {"step": step, **run_eval(step)}
    _checkpoint(engine, models, cfg, plan, tokenizer, controller, step, metrics, final=True)


def _micro_stats(pb: PreferenceBatch, out: Any, b: dict[str, torch.Tensor], cfg: RunConfig) -> torch.Tensor:
    """``[n (K) | v (K) | SCALARS]`` of one micro-batch, float64 on the CPU: exact sums to all-reduce."""
    n, v = violation_stats(pb, beta=cfg.loss.beta, signal=cfg.dual.violation)
    cr, rr = out.chosen_rewards.detach().double(), out.rejected_rewards.detach().double()
    scalars = torch.stack([
        out.losses.detach().double().sum(), torch.tensor(float(cr.numel()), dtype=torch.float64, device=cr.device),
        (cr > rr).double().sum(), (cr - rr).sum(), cr.sum(), rr.sum(), b["attention_mask"].sum().double(),
        # The margin-free DPO loss -log sigma(r_w - r_l): comparable across steps while lambda moves.
        -torch.nn.functional.logsigmoid(cr - rr).sum(),
    ])
    return torch.cat([n.cpu(), v.cpu(), scalars.cpu()])


def _optimizer_steps(engine: Any) -> float:
    """Largest Adam ``step`` in the (inner) torch optimizer state: > 0 iff optimizer state was restored."""
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    steps = [float(st["step"]) for st in getattr(opt, "state", {}).values() if isinstance(st, dict) and "step" in st]
    return max(steps) if steps else 0.0


def _flatten(current: dict[str, list[float]]) -> list[float]:
    return list(current["lambdas"]) + list(current["binding"])


def _step_row(glob: torch.Tensor, k: int, dt: float, step: int, epoch: int, engine: Any, world: int,
              gathered: torch.Tensor, categories: list[str]) -> dict[str, Any]:
    """One step's metrics row. ``gathered`` [world, K]: the lambda every rank used this step."""
    s = dict(zip(SCALARS, glob[2 * k :].tolist()))
    pairs = max(s["pairs"], 1.0)
    n, v = glob[:k], glob[k : 2 * k]
    return {
        "step": step,
        "epoch": epoch,
        "loss": s["loss_sum"] / pairs,
        "dpo_loss": s["dpo_loss_sum"] / pairs,
        "reward_acc": s["acc_sum"] / pairs,
        "reward_margin": s["margin_sum"] / pairs,
        "chosen_reward": s["chosen_reward_sum"] / pairs,
        "rejected_reward": s["rejected_reward_sum"] / pairs,
        "pairs": int(s["pairs"]),
        "pairs_per_s": s["pairs"] / dt,
        "tokens_per_s": s["tokens"] / dt,
        "step_time_s": dt,
        "lr": float(engine.get_lr()[0]),
        "world_size": world,
        "violation_rate": {c: (float(v[i] / n[i]) if n[i] > 0 else None) for i, c in enumerate(categories)},
        # Per-rank digests of the lambda each rank used (all-gathered): equal digests = bit-identical.
        "lambda_digests": [_digest(g) for g in gathered],
    }


def _local_checkpoints(root: Path) -> list[Path]:
    """Local-mode ``checkpoint_<step>`` directories, oldest first (``.partial`` / ``.old`` ones excluded)."""
    return sorted(d for d in root.glob("checkpoint_*") if d.name.removeprefix("checkpoint_").isdigit())


def _latest_local_checkpoint(root: Path) -> Any:
    """The newest complete local-mode checkpoint (its state file is written after the engine's save)."""
    import ray.train

    done = [d for d in _local_checkpoints(root) if (d / STATE_FILE).exists()]
    return ray.train.Checkpoint.from_directory(str(done[-1])) if done else None


def _prune_local_checkpoints(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` local-mode checkpoints (Ray's ``CheckpointConfig.num_to_keep`` semantics)."""
    for old in _local_checkpoints(root)[: -max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)


def _checkpoint(engine: Any, models: Models, cfg: RunConfig, plan: dict[str, Any], tokenizer: Any, controller: Any,
                step: int, metrics: dict[str, Any], *, final: bool) -> None:
    """Every rank saves its shard (+ dual state, step); rank 0 adds the HF export at the end; all report."""
    import ray
    import ray.train

    is_rank0 = D.rank() == 0
    # Ray-managed workers: staged under the system temp dir ($TMPDIR) and removed once ray.train.report
    # (SYNC upload) has copied it into the run's storage; otherwise a 13B run leaves one shard set per
    # checkpoint behind. Local mode persists nothing itself (report keeps a reference to the directory),
    # so there the checkpoint is written straight into the run's storage and the oldest are pruned.
    local = cfg.scaling.num_workers == 0
    if local:  # written beside, then renamed into place: a crash mid-save never destroys a complete one
        target = Path(plan["local_checkpoint_dir"]) / f"checkpoint_{step:06d}"
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f"catdpo-ckpt-{step}-"))
    try:
        dual_state = ray.get(controller.state_dict.remote()) if is_rank0 else None
        engine.save_checkpoint(str(tmp), tag=CKPT_TAG, client_state={"catdpo_step": step})
        if is_rank0:
            state = {"step": step, "dual": dual_state, "steps_per_epoch": plan["steps_per_epoch"], "run": plan["run_name"]}
            (tmp / STATE_FILE).write_text(json.dumps(state))
        if final and cfg.output.save_final:
            sd = gather_state_dict(engine.module, zero3=cfg.train.zero_stage == 3, is_rank0=is_rank0)
            if is_rank0:
                base_config = engine.module.config if not models.lora else engine.module.base_model.model.config
                if models.lora:
                    sd = merge_lora_state_dict(sd, scaling=cfg.model.lora.alpha / cfg.model.lora.r)
                save_hf_model(sd, base_config, tmp / "hf_model", tokenizer)
        D.barrier()
        if local:
            old = target.with_name(target.name + ".old")
            if target.exists():
                target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
            tmp = target
        ray.train.report({**metrics, "checkpoint_step": step}, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.SYNC)
    finally:
        if not local:
            shutil.rmtree(tmp, ignore_errors=True)
    if local:
        _prune_local_checkpoints(tmp.parent, cfg.output.num_checkpoints_to_keep)
    if is_rank0:
        ray.get(controller.record.remote({"kind": "checkpoint", "step": step, "final": final}))
