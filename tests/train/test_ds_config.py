"""The DeepSpeed dict and LR schedule derived from the run config (one place)."""

from __future__ import annotations

import math

from catdpo_ray.config import load_config
from catdpo_ray.train.ds_config import build_ds_config, build_reference_ds_config, lr_multiplier, use_torch_optimizer


def test_batch_arithmetic_and_sections() -> None:
    cfg = load_config(None, ["train.micro_batch_size=4", "train.grad_accum=2", "train.zero_stage=3", "train.precision=bf16",
                             "train.offload_optimizer=true", "train.offload_param=true", "scaling.num_workers=8"])
    ds = build_ds_config(cfg, world_size=8)
    assert ds["train_batch_size"] == 4 * 2 * 8 == cfg.global_batch_size
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["bf16"]["enabled"] is True
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert z["stage3_gather_16bit_weights_on_model_save"] is True
    ref = build_reference_ds_config(cfg, world_size=8)
    assert ref["zero_optimization"]["stage"] == 3 and "offload_optimizer" not in ref["zero_optimization"]
    assert "optimizer" not in ref


def test_cpu_uses_torch_optimizer_gpu_uses_deepspeed() -> None:
    cpu = load_config(None, [])
    assert use_torch_optimizer(cpu) and "optimizer" not in build_ds_config(cpu, world_size=2)
    gpu = load_config(None, ["scaling.use_gpu=true"])
    assert not use_torch_optimizer(gpu)
    assert build_ds_config(gpu, world_size=2)["optimizer"]["type"] == "AdamW"
    forced = load_config(None, ["scaling.use_gpu=true", "train.optimizer=torch"])
    assert use_torch_optimizer(forced)
    # ZeRO-1/2 on gloo: keep contiguous_gradients and reduce_scatter on (RAY_DEEPSPEED_NOTES pitfall 13)
    z = build_ds_config(cpu, world_size=2)["zero_optimization"]
    assert z["contiguous_gradients"] and z["reduce_scatter"] and z["stage"] == 2


def test_warmup_then_cosine() -> None:
    f = [lr_multiplier(s, total_steps=10, warmup_ratio=0.2, schedule="cosine", min_ratio=0.1) for s in range(10)]
    assert f[0] == 0.5 and f[1] == 1.0  # warmup = ceil(0.2*10) = 2 steps: 1/2, 2/2
    # step 2 starts the cosine at progress 0 -> 1.0; at step 10 it would reach min_ratio
    assert f[2] == 1.0
    expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8))  # step 9: progress (9-2)/(10-2)
    assert math.isclose(f[9], expected)
    assert all(a >= b for a, b in zip(f[1:], f[2:]))
    assert lr_multiplier(5, total_steps=10, warmup_ratio=0.0, schedule="constant", min_ratio=0.1) == 1.0
