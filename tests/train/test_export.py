"""Streaming sharded HF export (catdpo_ray/train/export.py) against the whole-model path.

The reference everywhere is the old export (``gather_state_dict`` [+ ``merge_lora_state_dict``] +
``save_hf_model``) or peft's own ``merge_and_unload``; engines are real DeepSpeed engines on a
1-rank gloo group (the worker's local-mode helper), models come through ``from_pretrained``.
"""

from __future__ import annotations

import copy
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from catdpo_ray.config import load_config
from catdpo_ray.train.export import export_hf_model
from catdpo_ray.train.modeling import (
    apply_lora,
    gather_state_dict,
    load_causal_lm,
    merge_lora_state_dict,
    save_hf_model,
)
from catdpo_ray.train.safetensors_layout import OutSpec, parse_size, plan_shards


def _read_export(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory, through the index when sharded (checks the index too)."""
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if not index.exists():
        return load_file(str(directory / "model.safetensors"))
    meta = json.loads(index.read_text())
    out: dict[str, torch.Tensor] = {}
    for file in sorted(set(meta["weight_map"].values())):
        part = load_file(str(directory / file))
        assert all(meta["weight_map"][k] == file for k in part)
        out.update(part)
    assert set(out) == set(meta["weight_map"])
    assert meta["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    return out


def _assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


@pytest.fixture
def process_group() -> Iterator[None]:
    """A 1-rank gloo group like the worker's local mode, torn down with DeepSpeed's cached view of it.

    Built here rather than imported from worker.py so these tests do not depend on the loop module."""
    import deepspeed.comm as ds_comm
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"})
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        if dist.is_initialized():
            ds_comm.destroy_process_group() if ds_comm.comm.cdb is not None else dist.destroy_process_group()
        ds_comm.comm.cdb = None


def _engine(cfg: Any, model: torch.nn.Module) -> Any:
    """A real DeepSpeed engine (torch AdamW, as on CPU) at ``cfg.train.zero_stage``."""
    import deepspeed

    from catdpo_ray.train.ds_config import build_ds_config

    deepspeed.init_distributed(dist_backend="gloo")
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=torch.optim.AdamW(params, lr=1e-4),
                                      config=build_ds_config(cfg, world_size=1))
    return engine


def _old_export(engine: Any, cfg: Any, out: Path, *, zero3: bool, lora_scaling: float | None = None) -> None:
    """The path export_hf_model replaces: whole state dict on rank 0, one unsharded file."""
    sd = gather_state_dict(engine.module, zero3=zero3, is_rank0=True)
    if lora_scaling is not None:
        sd = merge_lora_state_dict(sd, scaling=lora_scaling)
    config = engine.module.base_model.model.config if lora_scaling is not None else engine.module.config
    save_hf_model(sd, config, out, None)


def test_parse_size_units_and_errors() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5 mb") == 1_500_000
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size: cannot parse '5 parsecs'"):
        parse_size("5 parsecs")
    with pytest.raises(ValueError, match="must be positive"):
        parse_size(0)


def test_plan_shards_matches_huggingface_hub_split() -> None:
    """Same file -> tensors mapping as HF's splitter when no tensor exceeds the limit; an oversized
    tensor gets its own shard in walk order; each header is 8-aligned and ordered like safetensors."""
    from huggingface_hub import split_torch_state_dict_into_shards

    sizes = [30, 50, 20, 70, 10, 10, 40]  # float32 elements: 120+200+80 | 280+40+40 | 160 bytes
    state = {f"t{i}": torch.zeros(n) for i, n in enumerate(sizes)}
    specs = [OutSpec(k, tuple(v.shape), v.dtype, k) for k, v in state.items()]
    shards = plan_shards(specs, 400)
    split = split_torch_state_dict_into_shards(state, max_shard_size=400)
    assert {s.file: [x.name for x in s.specs] for s in shards} == split.filename_to_tensors
    assert [[x.name for x in s.specs] for s in shards] == [["t0", "t1", "t2"], ["t3", "t4", "t5"], ["t6"]]
    assert [s.file for s in shards] == [f"model-0000{i}-of-00003.safetensors" for i in range(1, 4)]
    big = plan_shards([*specs[:2], OutSpec("big", (200,), torch.float32, "big"), *specs[2:3]], 400)
    assert [[x.name for x in s.specs] for s in big] == [["t0", "t1"], ["big"], ["t2"]]
    mixed = plan_shards([OutSpec("b", (3,), torch.bfloat16, "b"), OutSpec("a", (2,), torch.float32, "a"),
                         OutSpec("c", (1,), torch.int64, "c")], 10**6)
    assert [s.file for s in mixed] == ["model.safetensors"]
    assert mixed[0].offsets == {"c": (0, 8), "a": (8, 16), "b": (16, 22)}
    assert len(mixed[0].header) % 8 == 0


def test_zero3_sharded_export_equals_unsharded(tiny_model_dir: str, tmp_path: Path, process_group: None) -> None:
    """(a) ZeRO-3: >= 3 shards, bit-equal to the whole-model export, loads, same logits; the
    one-shard export is byte-identical to ``save_hf_model``'s file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = load_config(None, ["train.zero_stage=3", "train.micro_batch_size=1", "train.grad_accum=1"])
    engine = _engine(cfg, load_causal_lm(cfg, tiny_model_dir))
    assert hasattr(next(engine.module.parameters()), "ds_id")  # really partitioned
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    _old_export(engine, cfg, tmp_path / "old", zero3=True)
    info = export_hf_model(engine.module, tmp_path / "final", tokenizer=tokenizer, zero3=True, is_rank0=True,
                           max_shard_size=2_000_000, layers_per_gather=2)
    export_hf_model(engine.module, tmp_path / "one", tokenizer=None, zero3=True, is_rank0=True)

    assert len(info.files) >= 3 and info.num_groups == 2 + 3  # embed, 2 layer groups, norm, lm_head
    assert sorted(p.name for p in (tmp_path / "final").glob("*.safetensors")) == sorted(info.files)
    assert not (tmp_path / "final.partial").exists()
    old = _read_export(tmp_path / "old")
    _assert_same_tensors(_read_export(tmp_path / "final"), old)
    assert (tmp_path / "one" / "model.safetensors").read_bytes() == (tmp_path / "old" / "model.safetensors").read_bytes()
    assert info.total_bytes == sum(t.numel() * t.element_size() for t in old.values())
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (tmp_path / "final" / name).exists(), name

    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    new_model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    old_model = AutoModelForCausalLM.from_pretrained(tmp_path / "old")
    with torch.no_grad():
        assert torch.equal(new_model(ids).logits, old_model(ids).logits)
        torch.testing.assert_close(new_model(ids).logits, engine.module(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_zero3_lora_export_equals_peft_merge_and_unload(tiny_model_dir: str, tmp_path: Path, process_group: None) -> None:
    """(b) LoRA merged group by group under ZeRO-3 equals peft's ``merge_and_unload`` of the same
    adapter (lora_B made non-zero), and the old whole-model merge bit for bit."""
    cfg = load_config(None, ["train.zero_stage=3", "train.micro_batch_size=1", "train.grad_accum=1",
                             "model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8"])
    model = apply_lora(cfg, load_causal_lm(cfg, tiny_model_dir))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B starts at zero: make the delta real
    base = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v.detach().clone()
            for k, v in model.named_parameters() if ".base_layer." in k}
    reference = copy.deepcopy(model).merge_and_unload()
    want = {k: v.detach() for k, v in reference.state_dict().items()}
    engine = _engine(cfg, model)
    assert any(hasattr(p, "ds_id") and ".lora_B." in n for n, p in engine.module.named_parameters())
    with pytest.raises(ValueError, match=r"lora_scaling=4\.0 but the model's LoRA layers scale by \[2\.0\]"):
        export_hf_model(engine.module, tmp_path / "final", tokenizer=None, zero3=True, is_rank0=True, lora_scaling=4.0)
    info = export_hf_model(engine.module, tmp_path / "final", tokenizer=None, zero3=True, is_rank0=True,
                           lora_scaling=8 / 4, max_shard_size=1_000_000, layers_per_gather=1)
    got = _read_export(tmp_path / "final")
    assert len(info.files) >= 3 and info.num_groups == 4 + 3
    assert sorted(got) == sorted(want)
    merged = [k for k in want if k.endswith("proj.weight")]
    assert len(merged) == 4 * 7
    for key, value in want.items():
        assert torch.equal(got[key], value), key  # same fp32 ops as peft: W + s (B @ A)
    assert sorted(merged) == sorted(base) and all(not torch.equal(got[k], base[k]) for k in merged)
    _old_export(engine, cfg, tmp_path / "old", zero3=True, lora_scaling=8 / 4)
    _assert_same_tensors(got, _read_export(tmp_path / "old"))
    assert json.loads((tmp_path / "final" / "config.json").read_text())["model_type"] == "llama"


def test_stage2_export_equals_module_parameters(tiny_model_dir: str, tmp_path: Path, process_group: None) -> None:
    """(c) ZeRO-2: full parameters on the rank; the export equals the old path and the module."""
    cfg = load_config(None, ["train.zero_stage=2", "train.micro_batch_size=1", "train.grad_accum=1"])
    engine = _engine(cfg, load_causal_lm(cfg, tiny_model_dir))
    info = export_hf_model(engine.module, tmp_path / "final", tokenizer=None, zero3=False, is_rank0=True,
                           max_shard_size="3MB")
    assert len(info.files) >= 2
    _old_export(engine, cfg, tmp_path / "old", zero3=False)
    got = _read_export(tmp_path / "final")
    _assert_same_tensors(got, _read_export(tmp_path / "old"))
    _assert_same_tensors(got, {k: v.detach() for k, v in engine.module.state_dict().items()})


def _tied_llama(tmp: Path) -> Path:
    """A random-initialised Llama with tied embeddings, saved through save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    path = tmp / "tied-src"
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_tied_embeddings_written_once_like_save_pretrained(tmp_path: Path) -> None:
    """Tied lm_head: the same keys as HF's save_pretrained (lm_head.weight dropped), reloads tied."""
    from transformers import AutoModelForCausalLM

    src = _tied_llama(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(src)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    export_hf_model(model, tmp_path / "final", tokenizer=None, zero3=False, is_rank0=True, max_shard_size=20_000)
    got = _read_export(tmp_path / "final")
    _assert_same_tensors(got, _read_export(src))
    assert "lm_head.weight" not in got
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


class _FailingTokenizer:
    """Stands in for a tokenizer whose files cannot be written (disk full, bad path)."""

    def save_pretrained(self, directory: Any) -> None:
        (Path(directory) / "tokenizer.json").write_text("{")  # half-written
        raise OSError("disk full while writing the tokenizer")


def test_failed_export_keeps_previous_final_and_leaves_no_partial(tmp_path: Path, process_group: None) -> None:
    """(d) A failure after the weights are written: the old final/ is byte-for-byte intact, the
    partial directory is gone, the error propagates; a stale .partial is cleared by the next export."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_tied_llama(tmp_path))
    final = tmp_path / "final"
    export_hf_model(model, final, tokenizer=None, zero3=False, is_rank0=True)
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full while writing the tokenizer"):
        export_hf_model(model, final, tokenizer=_FailingTokenizer(), zero3=False, is_rank0=True, max_shard_size=20_000)
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "tied-src"]

    (tmp_path / "final.partial").mkdir()
    (tmp_path / "final.partial" / "junk").write_text("from a killed run")
    export_hf_model(model, final, tokenizer=None, zero3=False, is_rank0=True, max_shard_size=20_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "tied-src"]
    assert torch.equal(_read_export(final)["model.norm.weight"], model.model.norm.weight.detach())
    assert "junk" not in {p.name for p in final.iterdir()}


def test_lora_parts_the_export_cannot_merge_are_refused(tiny_model_dir: str, tmp_path: Path) -> None:
    """A peft part without a merge rule (here a LoRA bias) fails by name before anything is written."""
    from peft import LoraConfig, get_peft_model

    cfg = load_config(None, [])
    model = get_peft_model(load_causal_lm(cfg, tiny_model_dir),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], lora_bias=True))
    with pytest.raises(ValueError, match=r"parameter base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_B"
                                         r"\.default\.bias is a peft part"):
        export_hf_model(model, tmp_path / "final", tokenizer=None, zero3=False, is_rank0=True)
    assert not (tmp_path / "final").exists() and not (tmp_path / "final.partial").exists()
