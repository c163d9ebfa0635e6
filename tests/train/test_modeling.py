"""LoRA export: our state-dict merge equals peft's merge_and_unload."""

from __future__ import annotations

import torch

from catdpo_ray.config import load_config
from catdpo_ray.train.modeling import apply_lora, load_causal_lm, merge_lora_state_dict


def test_lora_merge_matches_peft(tiny_model_dir: str) -> None:
    cfg = load_config(None, ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8"])
    model = apply_lora(cfg, load_causal_lm(cfg, tiny_model_dir))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B starts at zero; make the adapter non-trivial
    state = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert any(".lora_A." in k for k in state) and any(".base_layer." in k for k in state)
    ours = merge_lora_state_dict(state, scaling=8 / 4)
    reference = dict(model.merge_and_unload().named_parameters())
    assert set(ours) == set(reference)
    changed = 0
    for key, value in reference.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6)
        changed += int(not torch.equal(value, state.get(f"base_model.model.{key}", value)))
    assert changed == 0  # non-LoRA weights unchanged; the LoRA ones are compared via reference above
