"""The worker's models: the DeepSpeed policy engine and where reference log-probs come from.

Three reference modes (``model.reference``, resolved by :func:`reference_mode`):

- ``precompute``: the reference log-probs are columns of the batch (``ref_chosen_logps``,
  ``ref_rejected_logps`` and for B-DPO the mutual information), written once by the Ray Data
  reference stage (:mod:`catdpo_ray.data.reference`); the worker loads **no** reference model;
- ``online``: a frozen DeepSpeed engine of the same weights (no optimizer; sharded only under
  ZeRO-3), or with LoRA the policy with its adapter disabled (the same function as the base);
- ``none``: reference-free losses (SimPO): nothing is loaded and nothing is scored.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from catdpo_ray.config import RunConfig
from catdpo_ray.data.batching import packed_forward_logps
from catdpo_ray.losses import PreferenceBatch, mutual_information, sequence_logps
from catdpo_ray.train.ds_config import build_ds_config, build_reference_ds_config, lr_multiplier, use_torch_optimizer
from catdpo_ray.train.modeling import apply_lora, load_causal_lm

#: Batch columns written by the reference stage (per pair, ``[B]`` float32).
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
#: B-DPO's response-only reference log-probs written by the reference stage (``[B]``): with
#: ``REF_COLUMNS`` and the token counts they give the mutual information (METHOD.md section 5).
RESP_COLUMNS = ("ref_resp_chosen_logps", "ref_resp_rejected_logps")


def reference_mode(cfg: RunConfig) -> str:
    """``precompute`` | ``online`` | ``none`` for this config (``auto`` = precompute when the loss
    reads a reference, none for reference-free losses such as SimPO)."""
    from catdpo_ray.data.reference import resolve_reference_mode

    return resolve_reference_mode(cfg)


class Models:
    """Policy engine + reference log-probs according to :func:`reference_mode`."""

    def __init__(self, cfg: RunConfig, model_path: str, world: int, total_steps: int) -> None:
        import deepspeed

        self.cfg = cfg
        self.mode = reference_mode(cfg)
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
        if self.mode == "online" and not self.lora:
            ref = load_causal_lm(cfg, model_path)
            ref.requires_grad_(False)
            self.ref_engine, *_ = deepspeed.initialize(model=ref, config=build_reference_ds_config(cfg, world_size=world))
            self.ref_engine.eval()

    @staticmethod
    def _logps(model: Any, ids: torch.Tensor, attn: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        return sequence_logps(logits, ids, mask)

    def policy_logps(self, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logps [2B], token_counts [2B])`` of the chosen+rejected sequences (padded or packed rows)."""
        if "position_ids" in b:
            return packed_forward_logps(self.engine, b)
        return self._logps(self.engine, b["input_ids"], b["attention_mask"], b["loss_mask"])

    @torch.no_grad()
    def online_reference_logps(self, b: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
        """Reference ``logps [2B]`` computed now (``online`` mode only)."""
        if self.mode != "online":
            raise RuntimeError(f"online reference pass requested with model.reference resolved to {self.mode!r}")
        model = self.ref_engine if self.ref_engine is not None else self.engine
        if not prefix and "position_ids" in b:  # packed rows (B-DPO's response-only pass stays padded)
            if self.ref_engine is not None:
                return packed_forward_logps(model, b)[0]
            with self.engine.module.disable_adapter():
                return packed_forward_logps(model, b)[0]
        ids, attn, mask = b[prefix + "input_ids"], b[prefix + "attention_mask"], b[prefix + "loss_mask"]
        if self.ref_engine is not None:
            return self._logps(model, ids, attn, mask)[0]
        with self.engine.module.disable_adapter():
            return self._logps(model, ids, attn, mask)[0]


def _columns(b: dict[str, torch.Tensor], names: tuple[str, ...], device: torch.device) -> list[torch.Tensor]:
    missing = [n for n in names if n not in b]
    if missing:
        raise KeyError(f"model.reference=precompute but the batch has no {missing} column(s): the reference stage "
                       "did not run on this dataset")
    return [b[n].to(device) for n in names]


def preference_batch(models: Models, b: dict[str, torch.Tensor], lambdas: torch.Tensor, binding: torch.Tensor,
                     *, with_grad: bool, need_mi: bool) -> PreferenceBatch:
    """Policy and reference log-probs of one micro-batch as a :class:`PreferenceBatch`.

    ``b`` is a collated batch on the worker's device: ``input_ids`` etc. ``[2B, T]`` (chosen rows
    first), per-pair columns ``[B]``; with a precomputed reference also ``ref_*`` ``[B]``.
    """
    bsz = b["safety_gap"].shape[0]
    with torch.set_grad_enabled(with_grad):
        pol, counts = models.policy_logps(b)
    rc = rr = mi_c = mi_r = None
    if all(c in b for c in REF_COLUMNS):
        # Precomputed by the reference stage (training with model.reference=precompute, and the held-out
        # split whenever the workers hold no reference model): never the policy being trained.
        rc, rr = (b[c].to(pol.device, pol.dtype) for c in REF_COLUMNS)
        if need_mi:
            resp_c, resp_r = (t.to(pol.dtype) for t in _columns(b, RESP_COLUMNS, pol.device))
            mi_c = mutual_information(rc, resp_c, counts[:bsz].clamp(min=1))
            mi_r = mutual_information(rr, resp_r, counts[bsz:].clamp(min=1))
    elif models.mode == "online":
        ref = models.online_reference_logps(b)
        rc, rr = ref[:bsz], ref[bsz:]
        if need_mi:
            # B-DPO mutual information: log p_ref(y|x) - log p_ref(y) per token (METHOD.md section 5).
            ref_resp = models.online_reference_logps(b, prefix="resp_")
            mi = mutual_information(ref, ref_resp, counts.clamp(min=1))
            mi_c, mi_r = mi[:bsz], mi[bsz:]
    elif models.mode == "precompute":
        _columns(b, REF_COLUMNS, pol.device)  # raises: names the missing columns
    return PreferenceBatch(
        policy_chosen_logps=pol[:bsz], policy_rejected_logps=pol[bsz:],
        chosen_tokens=counts[:bsz], rejected_tokens=counts[bsz:],
        ref_chosen_logps=rc, ref_rejected_logps=rr,
        safety_gap=b["safety_gap"], category_mask=b["category_mask"],
        lambdas=lambdas.to(pol.device), binding=binding.to(pol.device).bool(),
        mi_chosen=mi_c, mi_rejected=mi_r,
    )
