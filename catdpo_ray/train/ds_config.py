"""The DeepSpeed config and the LR schedule, derived in one place from the run config.

Batch arithmetic: ``train_batch_size = micro_batch_size x grad_accum x world_size`` (pairs per
optimizer step; each pair is two sequences). Nothing else in the project restates it.
"""

from __future__ import annotations

import math
from typing import Any

from catdpo_ray.config import RunConfig


def use_torch_optimizer(cfg: RunConfig) -> bool:
    """Whether to hand DeepSpeed a ``torch.optim.AdamW`` (avoids DeepSpeed's C++ JIT build).

    ``auto`` = torch on CPU, DeepSpeed's fused Adam on GPUs.
    """
    if cfg.train.optimizer == "auto":
        return not cfg.scaling.use_gpu
    return cfg.train.optimizer == "torch"


def _zero_section(cfg: RunConfig, stage: int, *, for_reference: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {
        "stage": stage,
        # gloo-path bugs were reported with these off (RAY_DEEPSPEED_NOTES.md pitfall 13).
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "overlap_comm": cfg.scaling.use_gpu,
    }
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        zero["stage3_param_persistence_threshold"] = 1e4
    if cfg.train.offload_param and stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    if cfg.train.offload_optimizer and not for_reference and stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    return zero


def build_ds_config(cfg: RunConfig, *, world_size: int) -> dict[str, Any]:
    """DeepSpeed config of the trained policy."""
    t = cfg.train
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": _zero_section(cfg, t.zero_stage, for_reference=False),
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if use_torch_optimizer(cfg):
        # A client torch optimizer with ZeRO-Offload needs this escape hatch.
        ds["zero_force_ds_cpu_optimizer"] = False
    else:
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": t.lr, "weight_decay": t.weight_decay, "betas": [0.9, 0.95], "eps": 1e-8},
        }
    return ds


def build_reference_ds_config(cfg: RunConfig, *, world_size: int) -> dict[str, Any]:
    """DeepSpeed config of the frozen reference engine: no optimizer; sharded only under ZeRO-3."""
    t = cfg.train
    stage = 3 if t.zero_stage == 3 else 0
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": t.micro_batch_size * world_size,
        "zero_optimization": _zero_section(cfg, stage, for_reference=True),
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 10**9,
    }


def lr_multiplier(step: int, *, total_steps: int, warmup_ratio: float, schedule: str, min_ratio: float) -> float:
    """LR factor at optimizer step ``step`` (0-based): linear warmup, then cosine to ``min_ratio``."""
    warmup = int(math.ceil(warmup_ratio * total_steps))
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
