"""The model's shape from its ``config.json``: enough to count parameters and activations.

No weights are read: :func:`load_shape` goes through ``AutoConfig`` (a local directory, or a hub id
when the hub is reachable) and :meth:`ModelShape.from_config_dict` only reads the public fields of a
decoder-only Llama-family config (Llama, Mistral, Qwen2/Qwen3: RMSNorm, rotary, SwiGLU MLP, GQA).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Linear modules of one decoder layer, in the names peft/HF use (LoRA ``target_modules``).
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """Shapes of a Llama-family causal LM (``h`` hidden, ``a`` heads, ``kv`` KV heads, ``I`` MLP width)."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tie_embeddings: bool = False
    #: q/k/v projections carry a bias (Qwen2; ``attention_bias`` in Llama configs).
    qkv_bias: bool = False
    #: Per-head RMSNorm on q and k (Qwen3).
    qk_norm: bool = False

    @classmethod
    def from_config_dict(cls, cfg: dict[str, Any], *, source: str = "config.json") -> ModelShape:
        """Read the shape from a ``config.json`` dict; a missing required field names ``source`` and the key."""
        def need(key: str) -> int:
            if cfg.get(key) is None:
                raise ValueError(f"{source}: field {key!r} is missing; the planner needs it "
                                 "(a Llama-family decoder config: hidden_size, num_hidden_layers, ...)")
            return int(cfg[key])

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        model_type = str(cfg.get("model_type", "llama"))
        return cls(
            model_type=model_type,
            hidden=hidden,
            layers=need("num_hidden_layers"),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate=need("intermediate_size"),
            vocab=need("vocab_size"),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type == "qwen3",
        )

    # ---- parameter counts ----
    def linear_params(self) -> dict[str, int]:
        """Parameters of each projection of one decoder layer (weights, plus q/k/v biases when present)."""
        h, hd = self.hidden, self.head_dim
        q_out, kv_out = self.heads * hd, self.kv_heads * hd
        b = self.qkv_bias
        return {
            "q_proj": h * q_out + (q_out if b else 0),
            "k_proj": h * kv_out + (kv_out if b else 0),
            "v_proj": h * kv_out + (kv_out if b else 0),
            "o_proj": q_out * h,
            "gate_proj": h * self.intermediate,
            "up_proj": h * self.intermediate,
            "down_proj": self.intermediate * h,
        }

    def layer_params(self) -> int:
        """One decoder layer: the seven projections, two RMSNorms (and Qwen3's q/k norms)."""
        return sum(self.linear_params().values()) + 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)

    def total_params(self) -> int:
        """Unique parameters: embedding ``V*h`` + layers + final norm ``h`` + untied LM head ``V*h``."""
        emb = self.vocab * self.hidden
        return emb + self.layers * self.layer_params() + self.hidden + (0 if self.tie_embeddings else emb)

    def largest_module_params(self) -> int:
        """Parameters owned directly by the largest module (embedding or LM head for every real model):
        what DeepSpeed's ZeRO-3 estimator calls ``largest_layer_params``."""
        return max(self.vocab * self.hidden, *self.linear_params().values())

    def lora_params(self, r: int, target_modules: list[str]) -> int:
        """Trainable LoRA parameters: ``r * (in + out)`` for every targeted projection of every layer."""
        h, hd, i = self.hidden, self.head_dim, self.intermediate
        dims = {"q_proj": (h, self.heads * hd), "k_proj": (h, self.kv_heads * hd), "v_proj": (h, self.kv_heads * hd),
                "o_proj": (self.heads * hd, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        unknown = sorted(set(target_modules) - set(dims))
        if unknown:
            raise ValueError(f"model.lora.target_modules: {unknown} are not Llama-family projections; "
                             f"the planner knows {sorted(dims)}")
        return self.layers * sum(r * (dims[m][0] + dims[m][1]) for m in target_modules)


def load_shape(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False) -> ModelShape:
    """The shape of ``name_or_path`` (a directory with ``config.json`` or a hub id) without weights."""
    local = Path(name_or_path) / "config.json"
    if local.is_file():
        import json

        try:
            data = json.loads(local.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{local}: not valid JSON ({exc})") from exc
        return ModelShape.from_config_dict(data, source=str(local))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    return ModelShape.from_config_dict(config.to_dict(), source=f"{name_or_path}/config.json")
