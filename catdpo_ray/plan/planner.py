"""From a run config to a verdict: plan the job, decide whether it fits, find the smallest fix.

``preflight(cfg, model_path, hardware)`` is what the driver calls before it starts GPU workers;
``catdpo-ray plan`` prints the same :class:`PlanResult` through :func:`catdpo_ray.plan.report.format_plan`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from catdpo_ray.plan.memory import GIB, MemoryPlan, PlanSettings, plan_memory, with_changes
from catdpo_ray.plan.shapes import ModelShape, load_shape

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
          "KI": 1024, "MI": 1024**2, "GI": 1024**3, "TI": 1024**4}


def parse_size(text: str, *, what: str = "size") -> int:
    """``80GiB`` -> bytes (``GB`` = 10^9, ``GiB`` = 2^30, bare number = GiB); bad text names ``what``."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"{what}: {text!r} is not a size like 80GiB, 40GB or 512GiB")
    unit = (m.group(2) or "GiB").upper().removesuffix("B")
    return int(float(m.group(1)) * _UNITS[unit])


def machine_memory() -> int:
    """Physical memory of this machine (bytes)."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@dataclass(frozen=True)
class Hardware:
    """What the job runs on: per-GPU memory, GPUs per node, host memory per node (``None`` = unchecked
    on GPU runs; this machine's memory on CPU runs)."""

    gpu_memory: int = 80 * GIB
    gpus_per_node: int = 8
    host_memory: int | None = None


@dataclass(frozen=True)
class PlanResult:
    """A plan, its verdict, and (when it does not fit) the smallest change that does."""

    plan: MemoryPlan
    hardware: Hardware
    model: str
    fits: bool
    problems: list[str] = field(default_factory=list)
    #: ``key=value`` overrides of the smallest change that fits (empty when it fits or nothing does).
    fix: list[str] = field(default_factory=list)
    fix_plan: MemoryPlan | None = None

    @property
    def exit_code(self) -> int:
        """0 fits, 3 does not (2 is kept for usage and config errors)."""
        return 0 if self.fits else 3


def settings_from_config(cfg: Any, *, gpus_per_node: int = 8) -> PlanSettings:
    """The memory-relevant part of a :class:`catdpo_ray.config.RunConfig`."""
    lora = cfg.model.lora
    return PlanSettings(
        num_workers=cfg.scaling.num_workers,
        gpus_per_node=gpus_per_node,
        use_gpu=cfg.scaling.use_gpu,
        zero_stage=int(cfg.train.zero_stage),
        precision=cfg.train.precision,
        offload_optimizer=cfg.train.offload_optimizer,
        offload_param=cfg.train.offload_param,
        lora=lora.enabled,
        lora_r=lora.r,
        lora_targets=tuple(lora.target_modules),
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        # from_pretrained's default on torch >= 2.1 is sdpa.
        attn_implementation=cfg.model.attn_implementation or "sdpa",
        micro_batch_size=cfg.train.micro_batch_size,
        grad_accum=cfg.train.grad_accum,
        seq_len=cfg.data.max_length,
        reference=reference_mode(cfg),
    )


def reference_mode(cfg: Any) -> str:
    """``online`` | ``precompute`` | ``none``, resolved as the worker resolves ``model.reference``
    (``auto`` = precompute; reference-free losses such as SimPO load none)."""
    from catdpo_ray import losses

    needs = getattr(losses, "NEEDS_REFERENCE", {"simpo": False})
    if not needs.get(cfg.loss.name, True):
        return "none"
    mode = str(getattr(cfg.model, "reference", "online"))
    return "precompute" if mode == "auto" else mode


def check(plan: MemoryPlan, hw: Hardware) -> list[str]:
    """Why ``plan`` does not fit ``hw`` (empty list = it fits)."""
    s, out = plan.settings, []
    if s.use_gpu:
        if plan.device_total > hw.gpu_memory:
            out.append(f"per GPU {plan.device_total / GIB:.1f} GiB > {hw.gpu_memory / GIB:.1f} GiB of GPU memory")
        if hw.host_memory is not None and plan.host_per_node > hw.host_memory:
            out.append(f"per node host {plan.host_per_node / GIB:.1f} GiB > {hw.host_memory / GIB:.1f} GiB")
    else:
        host = hw.host_memory if hw.host_memory is not None else machine_memory()
        if plan.host_per_node > host:
            out.append(f"{s.workers_per_node} CPU worker(s) x {plan.host_per_node / s.workers_per_node / GIB:.1f} GiB "
                       f"= {plan.host_per_node / GIB:.1f} GiB > {host / GIB:.1f} GiB of host memory")
    return out


def _candidates(s: PlanSettings, hw: Hardware) -> list[tuple[dict[str, Any], list[str]]]:
    """Single changes in the order tried: checkpointing, ZeRO stage up, micro-batch down (grad_accum
    up to keep the global batch), optimizer offload, parameter offload, LoRA, more GPUs."""
    out: list[tuple[dict[str, Any], list[str]]] = []
    if not s.gradient_checkpointing:
        out.append(({"gradient_checkpointing": True}, ["model.gradient_checkpointing=true"]))
    for stage in range(s.zero_stage + 1, 4):
        out.append(({"zero_stage": stage}, [f"train.zero_stage={stage}"]))
    mb = s.micro_batch_size // 2
    while mb >= 1:
        accum = s.grad_accum * s.micro_batch_size // mb  # same global batch (micro x accum x workers)
        out.append(({"micro_batch_size": mb, "grad_accum": accum},
                    [f"train.micro_batch_size={mb}", f"train.grad_accum={accum}"]))
        mb //= 2
    if not s.offload_optimizer:
        stage = max(s.zero_stage, 2)
        keys = ([] if stage == s.zero_stage else [f"train.zero_stage={stage}"]) + ["train.offload_optimizer=true"]
        out.append(({"offload_optimizer": True, "zero_stage": stage}, keys))
    if not s.offload_param and s.use_gpu:
        keys = ([] if s.zero_stage == 3 else ["train.zero_stage=3"]) + ["train.offload_param=true"]
        if not s.offload_optimizer:
            keys.append("train.offload_optimizer=true")
        out.append(({"offload_param": True, "offload_optimizer": True, "zero_stage": 3}, keys))
    if not s.lora:
        out.append(({"lora": True}, ["model.lora.enabled=true"]))
    if s.use_gpu:
        for nodes in range(s.num_nodes + 1, s.num_nodes + 9):
            workers = nodes * hw.gpus_per_node
            out.append(({"num_workers": workers}, [f"scaling.num_workers={workers}"]))
    return out


def _fix_keys(keys: list[str]) -> list[str]:
    """Merge override lists, the last value of a key winning, order of first appearance kept."""
    merged: dict[str, str] = {}
    for k in keys:
        merged[k.split("=", 1)[0]] = k
    return list(merged.values())


def smallest_fix(shape: ModelShape, s: PlanSettings, hw: Hardware) -> tuple[list[str], MemoryPlan | None]:
    """The first single change that fits; else the cumulative changes in the same order."""
    cands = _candidates(s, hw)
    for changes, keys in cands:
        plan = plan_memory(shape, with_changes(s, **changes))
        if not check(plan, hw):
            return keys, plan
    acc, acc_keys = s, []
    for changes, keys in cands:
        if "num_workers" in changes and acc.num_workers >= changes["num_workers"]:
            continue
        if "micro_batch_size" in changes and acc.micro_batch_size <= changes["micro_batch_size"]:
            continue
        acc, acc_keys = with_changes(acc, **changes), _fix_keys(acc_keys + keys)
        plan = plan_memory(shape, acc)
        if not check(plan, hw):
            return acc_keys, plan
    return [], None


def plan_run(cfg: Any, shape: ModelShape, hw: Hardware, *, model: str = "") -> PlanResult:
    """Plan ``cfg`` on ``hw``; when it does not fit, search for the smallest change that does."""
    settings = settings_from_config(cfg, gpus_per_node=hw.gpus_per_node)
    plan = plan_memory(shape, settings)
    problems = check(plan, hw)
    fix, fix_plan = smallest_fix(shape, settings, hw) if problems else ([], None)
    return PlanResult(plan=plan, hardware=hw, model=model or cfg.model.name_or_path, fits=not problems,
                      problems=problems, fix=fix, fix_plan=fix_plan)


def resolve_model_path(cfg: Any) -> str:
    """``tiny`` -> the built tiny model's directory; anything else unchanged."""
    if cfg.model.name_or_path == "tiny":
        from catdpo_ray.tiny import ensure_tiny_model

        return str(ensure_tiny_model(cfg.model.cache_dir))
    return str(cfg.model.name_or_path)


def preflight(cfg: Any, model_path: str, hardware: Hardware | None = None) -> PlanResult:
    """The plan the driver runs before starting workers (reads ``model_path``'s config.json only)."""
    shape = load_shape(model_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    return plan_run(cfg, shape, hardware or Hardware(), model=model_path)
