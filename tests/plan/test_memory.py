"""The planner's arithmetic: hand-computed values, parameter counts of real shapes, DeepSpeed parity."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from catdpo_ray.plan.memory import CUDA_CONTEXT_BYTES, PlanSettings, activation_bytes_per_layer, plan_memory
from catdpo_ray.plan.shapes import ModelShape, load_shape

FIXTURES = Path(__file__).parent / "fixtures"
SMALL = ModelShape(model_type="llama", hidden=8, layers=2, heads=2, kv_heads=2, head_dim=4, intermediate=16, vocab=32)


def test_public_parameter_counts() -> None:
    """Published parameter counts of the four job models, from config.json alone."""
    counts = {name: load_shape(str(FIXTURES / name)).total_params() for name in
              ("llama-2-7b", "llama-2-13b", "llama-2-70b", "qwen3-8b")}
    assert counts == {"llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320,
                      "llama-2-70b": 68_976_648_192, "qwen3-8b": 8_190_735_360}


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen3-tied"])
def test_counts_match_instantiated_hf_models(kind: str) -> None:
    """Total, largest-module and LoRA counts equal those of the real HF / peft modules (meta device)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 300, "head_dim": 16}
    if kind == "llama-gqa":
        hf = AutoConfig.for_model("llama", **cfg)
    else:
        hf = AutoConfig.for_model("qwen3", **cfg, tie_word_embeddings=True)
    shape = ModelShape.from_config_dict(hf.to_dict())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert shape.total_params() == sum(unique.values())
    assert shape.largest_module_params() == max(
        sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    targets = ["q_proj", "v_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    assert shape.lora_params(4, targets) == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_hand_computed_small_plan() -> None:
    """h=8, 2 layers, 2 heads (head_dim 4, no GQA), I=16, V=32, untied; bf16 (d=2), ZeRO-2, N=4 GPUs,
    micro-batch 1 pair (2 sequences) of 4 tokens, sdpa, no checkpointing, online reference.

    P = embed 256 + 2 x (q,k,v,o 4x64 + gate,up,down 3x128 + 2 norms 16 = 656) + final norm 8 + head 256
      = 1832.
    parameters 2P = 3664; gradients 2P/4 + 4P/4 = 916 + 1832 = 2748; optimizer 12P/4 = 5496;
    reference (ZeRO-0 copy) 2P = 3664.
    activations per token per layer: norms 2 x (3 x 2 x 8 + 4 x 8) = 160, q 16, k+v 32, o_proj input 16,
      SwiGLU 4 x 2 x 16 = 128, sdpa output 16 -> 368; x 8 tokens = 2944 per layer (eager: 352 + softmax
      2 heads x 4 x (4+2) = 48 -> 400 x 8 = 3200; checkpointed: 8 x 2 x 8 = 128);
      layers 2 x 2944 = 5888, final norm + head input 8 x 80 = 640, bool mask 2 x 4 x 4 = 32 -> 6560.
    logits: 2 x 2 x 8 tokens x 32 = 1024 plus fp32 rows 3 x 4 x 4 x 32 = 1536 -> 2560.
    buckets: min(5e8, P) x 2 = 3664.
    allocated 28356; fragmentation int(0.1 x 28356) = 2835; CUDA context 0.5 GiB.
    """
    assert SMALL.total_params() == 1832
    s = PlanSettings(num_workers=4, gpus_per_node=4, zero_stage=2, precision="bf16", micro_batch_size=1, seq_len=4,
                     attn_implementation="sdpa")
    plan = plan_memory(SMALL, s)
    assert plan.device == {
        "parameters": 3664, "gradients": 2748, "optimizer states": 5496, "reference model": 3664,
        "activations": 6560, "logits": 2560, "communication buckets": 3664, "fragmentation (10%)": 2835,
        "CUDA context": CUDA_CONTEXT_BYTES,
    }
    assert activation_bytes_per_layer(SMALL, s) == {"eager": 3200, "sdpa": 2944, "flash_attention_2": 2944,
                                                     "checkpointed": 128}
    ckpt = plan_memory(SMALL, PlanSettings(**{**s.__dict__, "gradient_checkpointing": True}))
    assert ckpt.device["activations"] == 2 * 128 + 2944 + 640 + 32
    assert plan_memory(SMALL, PlanSettings(**{**s.__dict__, "reference": "precompute"})).device["reference model"] == 0


def test_stage_table_fp32_and_offload() -> None:
    """fp32 ZeRO-0 = 4+4+8 bytes/param; ZeRO-3 + offload of both leaves only the gathered set on the GPU."""
    p = SMALL.total_params()
    s0 = plan_memory(SMALL, PlanSettings(num_workers=2, zero_stage=0, precision="fp32", use_gpu=False))
    assert (s0.device["parameters"], s0.device["gradients"], s0.device["optimizer states"]) == (4 * p, 4 * p, 8 * p)
    off = plan_memory(SMALL, PlanSettings(num_workers=4, zero_stage=3, offload_optimizer=True, offload_param=True))
    assert off.model_states == off.device["zero3 gathered params"] == 2 * 2 * SMALL.largest_module_params()
    assert off.host["offloaded optimizer states"] == 12 * p // 4
    assert off.host["offloaded parameters"] == 2 * p // 4


# ---- parity with DeepSpeed's estimators (bf16, the mixed-precision case they model) ----

def _ds_estimates() -> tuple[object, object]:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs


@pytest.mark.parametrize("model", ["llama-2-7b", "llama-2-13b", "qwen3-8b"])
@pytest.mark.parametrize("gpus", [8, 16])
def test_model_states_agree_with_deepspeed(model: str, gpus: int) -> None:
    """ZeRO-2 (with and without optimizer offload) and ZeRO-3 with offload: within 5 % (in fact equal).

    ZeRO-3 without offload: DeepSpeed's estimator counts 18 P/N; ZeRO-3 allocates the 16-bit
    parameter partition (2P/N) besides its 16-bit gradient partition (2P/N), fp32 master (4P/N),
    fp32 gradient at step (4P/N) and Adam (8P/N): the plan is exactly 2P/N above the estimator.
    """
    z2, z3 = _ds_estimates()
    shape = load_shape(str(FIXTURES / model))
    p, largest = shape.total_params(), shape.largest_module_params()
    nodes, per_node = max(1, gpus // 8), min(gpus, 8)

    def ours(**kw: object) -> int:
        return plan_memory(shape, PlanSettings(num_workers=gpus, gpus_per_node=8, precision="bf16", **kw)).model_states

    cases = [
        (ours(zero_stage=2), z2(p, per_node, nodes, cpu_offload=False)[1]),
        (ours(zero_stage=2, offload_optimizer=True), z2(p, per_node, nodes, cpu_offload=True)[1]),
        (ours(zero_stage=3, offload_optimizer=True), z3(p, largest, per_node, nodes, cpu_offload=True,
                                                        cpu_offload_params=False)[1]),
        (ours(zero_stage=3, offload_optimizer=True, offload_param=True),
         z3(p, largest, per_node, nodes, cpu_offload=True, cpu_offload_params=True)[1]),
    ]
    for planned, deepspeed_bytes in cases:
        assert abs(planned / deepspeed_bytes - 1) < 0.05, (planned, deepspeed_bytes)
    z3_plain = z3(p, largest, per_node, nodes, cpu_offload=False, cpu_offload_params=False)[1]
    assert abs(ours(zero_stage=3) - z3_plain - 2 * p // gpus) <= 2


def test_live_estimator_on_a_real_model(capsys: pytest.CaptureFixture[str]) -> None:
    """DeepSpeed's ``..._all_live`` estimators on an instantiated Llama print the same per-GPU GB."""
    import torch
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_live
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_live
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                              num_attention_heads=4, vocab_size=4096)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf)
    shape = ModelShape.from_config_dict(hf.to_dict())
    def printed_rows(estimate: object) -> list[tuple[str, float]]:
        """Rows "  per CPU | per GPU | Options" the estimator prints: (options, GPU GB)."""
        estimate(model, num_gpus_per_node=4)  # type: ignore[operator]
        out = capsys.readouterr().out
        return [(line.split("|")[2], float(re.findall(r"([\d.]+)GB", line)[1]))
                for line in out.splitlines() if line.count("|") == 2 and "GB" in line]

    rows2 = printed_rows(estimate_zero2_model_states_mem_needs_all_live)
    rows3 = printed_rows(estimate_zero3_model_states_mem_needs_all_live)

    def gpu_gb(*need: str, rows: list[tuple[str, float]] = rows3) -> float:
        (gb,) = [gb for opts, gb in rows if all(n in opts for n in need) and "zero_init=0" not in opts]
        return gb

    def ours(**kw: object) -> float:
        return plan_memory(shape, PlanSettings(num_workers=4, gpus_per_node=4, **kw)).model_states / 2**30

    p = shape.total_params()
    assert gpu_gb("offload_optimizer=none", rows=rows2) == pytest.approx(ours(zero_stage=2), abs=0.006)
    assert gpu_gb("offload_param=none", "offload_optimizer=OffloadDeviceEnum.cpu") == pytest.approx(
        ours(zero_stage=3, offload_optimizer=True), abs=0.006)
    # ZeRO-3 without offload: the plan adds the 16-bit parameter partition 2P/N the estimator leaves out.
    assert gpu_gb("offload_param=none", "offload_optimizer=none") == pytest.approx(
        ours(zero_stage=3) - 2 * p / 4 / 2**30, abs=0.006)
