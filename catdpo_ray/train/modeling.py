"""Model loading (policy, reference, LoRA) and HF export, for the worker.

Models always come through ``AutoModelForCausalLM.from_pretrained``: the tiny test model and a
13B model take the same path. Under ZeRO-3 an ``HfDeepSpeedConfig`` is kept alive while loading
so transformers partitions weights at load time instead of materialising them on every rank.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from catdpo_ray.config import RunConfig


def import_deepspeed_in_worker() -> Any:
    """``import deepspeed`` in a Ray Train worker process, without the ``import mlflow`` it makes.

    DeepSpeed's autotuner (``deepspeed/autotuning/autotuner.py``, imported by ``import deepspeed``)
    imports mlflow when it is installed, for its own tuning runs: 1.3 s of every worker's start here
    (mlflow-skinny 3.17). The trainer never runs DeepSpeed's autotuner and its workers never log to
    MLflow (the driver does, ``logging.mlflow_tracking_uri``), so while DeepSpeed is imported
    ``sys.modules["mlflow"]`` is set to None (the autotuner then records ``has_mlflow=False``) and
    removed afterwards: a later ``import mlflow`` in the process works as usual. Only for worker
    processes; local mode (the driver's own process) imports DeepSpeed plainly.
    """
    import sys

    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError meanwhile
    try:
        import deepspeed
    finally:
        if sys.modules.get("mlflow", False) is None:
            del sys.modules["mlflow"]
    return deepspeed


def torch_dtype(cfg: RunConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32


def load_causal_lm(cfg: RunConfig, path: str) -> torch.nn.Module:
    """One copy of the model from ``path`` in the run's dtype."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch_dtype(cfg), "trust_remote_code": cfg.model.trust_remote_code}
    if cfg.model.revision:
        kwargs["revision"] = cfg.model.revision
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False
    return model


def apply_lora(cfg: RunConfig, model: torch.nn.Module) -> torch.nn.Module:
    """Wrap ``model`` with a peft LoRA adapter; the adapter-disabled model is the reference."""
    from peft import LoraConfig, get_peft_model

    lc = cfg.model.lora
    peft_cfg = LoraConfig(
        r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules), task_type="CAUSAL_LM"
    )
    # autocast_adapter_dtype=False keeps adapter weights in the base dtype (a ZeRO-3 dtype error otherwise).
    return get_peft_model(model, peft_cfg, autocast_adapter_dtype=False)


def gather_state_dict(module: torch.nn.Module, *, zero3: bool, is_rank0: bool) -> dict[str, torch.Tensor]:
    """Full CPU state dict on rank 0 (empty elsewhere). Under ZeRO-3 one parameter is gathered
    at a time, so peak memory is one full tensor; every rank makes the same gather calls."""
    import deepspeed

    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        if zero3 and hasattr(param, "ds_id"):
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if is_rank0:
                    out[name] = param.data.detach().cpu().clone()
        elif is_rank0:
            out[name] = param.detach().cpu().clone()
    if is_rank0:
        # Non-persistent buffers (rotary tables) are not weights; read the sets, not state_dict()
        # (rank 0 alone must not call anything that could gather under ZeRO-3).
        transient = {f"{m}.{b}" if m else b for m, mod in module.named_modules() for b in mod._non_persistent_buffers_set}
        for name, buf in module.named_buffers():
            if name not in transient:
                out.setdefault(name, buf.detach().cpu().clone())
    return out


def merge_lora_state_dict(state: dict[str, torch.Tensor], *, scaling: float, adapter: str = "default") -> dict[str, torch.Tensor]:
    """peft LoRA state dict -> plain HF state dict with W' = W + scaling * (B @ A).

    Keys ``base_model.model.<p>.base_layer.weight``, ``<p>.lora_A.<adapter>.weight`` [r, in] and
    ``<p>.lora_B.<adapter>.weight`` [out, r] become ``<p>.weight``; ``scaling`` = alpha / r.
    """
    prefix = "base_model.model."
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        name = key[len(prefix):] if key.startswith(prefix) else key
        if ".base_layer." in name:
            module = name.split(".base_layer.")[0]
            full = prefix + module if key.startswith(prefix) else module
            a = state.get(f"{full}.lora_A.{adapter}.weight")
            b = state.get(f"{full}.lora_B.{adapter}.weight")
            name = name.replace(".base_layer.", ".")
            if a is not None and b is not None and name.endswith(".weight"):
                value = (value.float() + scaling * (b.float() @ a.float())).to(value.dtype)
        merged[name] = value
    return merged


def save_hf_model(state: dict[str, torch.Tensor], model_config: Any, out_dir: Path, tokenizer: Any | None) -> None:
    """Write an HF model directory (config.json + model.safetensors [+ tokenizer])."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    model_config.save_pretrained(out_dir)
    tensors = {k: v.contiguous() for k, v in state.items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))
