"""Final HF export that scales: ZeRO-3 gathers a few layers at a time, LoRA merged per layer,
safetensors shards streamed to disk, written straight into the run's ``final/``.

Why not ``gather_state_dict`` + ``save_hf_model``: those hold the whole model (twice while a LoRA
merge runs) in rank 0's host memory, 140 GB at 70B in bf16, and write one unsharded file that the
driver then copies again. Here:

1. Every output tensor's name, shape and dtype is known before anything is gathered (ZeRO-3 keeps
   ``param.ds_shape``), so the whole shard layout, including each shard's safetensors header, is
   planned up front with HF's greedy rule (a tensor starts a new shard when it would overflow
   ``max_shard_size``; one larger than the limit gets a shard of its own, which, unlike
   ``huggingface_hub``'s splitter, stays at its place in walk order so one file is open at a time).
2. Parameters are walked in groups of ``layers_per_gather`` transformer layers (embeddings, final
   norm and ``lm_head`` are groups of their own). Every rank gathers a group with
   ``deepspeed.zero.GatheredParameters(modifier_rank=None)``; rank 0 merges LoRA for that group
   (``W' = W + (alpha / r) B A``, Hu et al. 2021, eq. 3; peft names -> plain HF names), copies one
   tensor at a time to the CPU and writes its bytes at its planned offset; the group is released
   before the next. Host memory is therefore bounded by one group (plus one tensor's fp32 merge
   temporaries), independent of the model and of ``max_shard_size``: no shard is ever assembled in
   memory, which ``safetensors.torch.save_file`` would need.
3. Files go to ``<out_dir>.partial`` and are renamed into place once complete; an existing
   ``out_dir`` is replaced only then. On failure the partial directory is removed and the old
   export stays untouched. A failure on rank 0 mid-walk does not desynchronise the collectives:
   rank 0 stops writing but keeps joining the gathers, and one MAX all-reduce at the end makes
   every rank raise.

The safetensors format (8-byte little-endian header length, JSON header padded with spaces to a
multiple of 8, then the tensors' raw bytes, gap-free) is written the way ``safetensors`` orders it:
by descending element size then name, which keeps every tensor aligned to its element size.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from catdpo_ray.train.safetensors_layout import OutSpec, ShardWriter, parse_size, plan_shards

INDEX_FILE = "model.safetensors.index.json"
PEFT_PREFIX = "base_model.model."

@dataclass(frozen=True)
class ExportInfo:
    """What ``export_hf_model`` wrote (identical on every rank)."""

    out_dir: Path
    files: list[str]
    total_bytes: int
    num_tensors: int
    num_groups: int
    max_group_bytes: int


@dataclass
class _Group:
    """Parameters gathered together (a few layers, or one top-level module) and what they emit."""

    params: dict[str, torch.nn.Parameter] = field(default_factory=dict)
    outs: list[OutSpec] = field(default_factory=list)


def _hf_name(name: str) -> str:
    """peft name -> plain HF name: drop the wrapper prefix and the LoRA ``base_layer`` hop."""
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def _layer_prefix(module: torch.nn.Module, num_layers: int | None) -> str | None:
    """Name of the transformer block list: the ``ModuleList`` of ``num_hidden_layers`` (else the longest)."""
    lists = [(n, m) for n, m in module.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
    exact = [n for n, m in lists if len(m) == num_layers]
    if exact:
        return exact[0]
    return max(lists, key=lambda nm: len(nm[1]))[0] if lists else None


def _lora_layers(module: torch.nn.Module, adapter: str) -> dict[str, tuple[str, str, float]]:
    """``<module>.base_layer.weight`` -> (lora_A name, lora_B name, scaling) for every peft LoRA layer."""
    out: dict[str, tuple[str, str, float]] = {}
    for name, mod in module.named_modules():
        lora_a = getattr(mod, "lora_A", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or adapter not in lora_a:
            continue
        if getattr(mod, "fan_in_fan_out", False) or getattr(mod, "use_dora", {}).get(adapter, False):
            raise ValueError(f"export: LoRA layer {name}: fan_in_fan_out / DoRA adapters are not supported")
        if adapter in getattr(mod, "merged_adapters", []):
            continue  # the delta is already inside base_layer.weight
        out[f"{name}.base_layer.weight"] = (f"{name}.lora_A.{adapter}.weight", f"{name}.lora_B.{adapter}.weight",
                                            float(mod.scaling[adapter]))
    return out


def plan_groups(module: torch.nn.Module, *, num_layers: int | None, layers_per_gather: int,
                adapter: str = "default") -> list[_Group]:
    """Walk order of the export: parameter groups and the tensors each one emits.

    Tied weights appear once: ``named_parameters`` de-duplicates shared Parameters and keeps the
    first name (``model.embed_tokens.weight`` for Llama), which is also the name HF's
    ``save_pretrained`` keeps when it drops the ``_tied_weights_keys`` alias (``lm_head.weight``).
    """
    if layers_per_gather < 1:
        raise ValueError(f"layers_per_gather must be >= 1, got {layers_per_gather}")
    prefix = _layer_prefix(module, num_layers)
    lora = _lora_layers(module, adapter)
    consumed = {n for a, b, _ in lora.values() for n in (a, b)}
    groups: dict[str, _Group] = {}
    seen: set[str] = set()
    for name, param in module.named_parameters():
        if prefix is not None and name.startswith(prefix + "."):
            key = f"layers:{int(name[len(prefix) + 1:].split('.')[0]) // layers_per_gather}"
        else:  # one top-level module per group: its LoRA parts (if any) share the module path
            key = re.sub(r"\.(base_layer|lora_[AB]\.[^.]+)\.", ".", name).rsplit(".", 1)[0]
        group = groups.setdefault(key, _Group())
        group.params[name] = param
        if name in consumed:
            continue
        if ".lora_" in name or ".modules_to_save." in name or ".original_module." in name:
            raise ValueError(f"export: parameter {name} is a peft part this export cannot merge")
        out_name = _hf_name(name)
        if out_name in seen:
            raise ValueError(f"export: two parameters map to the HF name {out_name}")
        seen.add(out_name)
        shape = tuple(getattr(param, "ds_shape", param.shape))
        group.outs.append(OutSpec(out_name, shape, param.dtype, name, lora.get(name)))
    for name, (a, b, _) in lora.items():
        key = next((k for k, g in groups.items() if name in g.params), None)
        if key is None or a not in groups[key].params or b not in groups[key].params:
            raise ValueError(f"export: LoRA parts of {name} ({a}, {b}) are not gathered together")
    # Persistent buffers only (rotary tables are non-persistent): read the sets, never state_dict(),
    # which would gather under ZeRO-3 on whichever rank calls it. Buffers are never partitioned.
    transient = {f"{m}.{b}" if m else b for m, mod in module.named_modules() for b in mod._non_persistent_buffers_set}
    buffers = _Group()
    for name, buf in module.named_buffers():
        if name not in transient and _hf_name(name) not in seen:
            seen.add(_hf_name(name))
            buffers.outs.append(OutSpec(_hf_name(name), tuple(buf.shape), buf.dtype, name))
            buffers.params[name] = buf  # type: ignore[assignment]
    return [*groups.values(), *([buffers] if buffers.outs else [])]


def _emit(group: _Group, values: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """The group's output tensors; LoRA layers merged as in ``merge_lora_state_dict`` (bit-equal)."""
    for spec in group.outs:
        value = values[spec.source]
        if spec.lora is not None:
            a, b, scaling = spec.lora
            value = (value.float() + scaling * (values[b].float() @ values[a].float())).to(value.dtype)
        yield spec.name, value


def _gathered(params: list[torch.nn.Parameter], zero3: bool) -> Any:
    """All ranks' shards of ``params`` assembled on every rank (ZeRO-3), released on exit."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not (zero3 and partitioned):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def _any_rank_failed(failed: bool) -> bool:
    """MAX all-reduce of a failure flag (a collective when a process group exists)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return failed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([int(failed)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _swap_into_place(partial: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` with the complete ``partial`` (the old one is kept until the new one is in place)."""
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    partial.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _write_metadata(directory: Path, base: Any, model_config: Any, tokenizer: Any | None, dtype: torch.dtype | None) -> None:
    """config.json (exported dtype, KV cache back on), generation_config.json, tokenizer files."""
    config = copy.deepcopy(model_config)
    if dtype is not None:
        config.dtype = str(dtype).removeprefix("torch.")
    config.use_cache = True  # load_causal_lm turns it off for training; generation wants it
    config.save_pretrained(directory)
    generation = getattr(base, "generation_config", None)
    if generation is not None and getattr(base, "can_generate", lambda: False)():
        generation.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def export_hf_model(module: torch.nn.Module, out_dir: Path, *, tokenizer: Any | None, zero3: bool, is_rank0: bool,
                    model_config: Any | None = None, lora_scaling: float | None = None, max_shard_size: int | str = "5GB",
                    layers_per_gather: int = 2, adapter: str = "default") -> ExportInfo:
    """Write ``module`` (plain HF or peft LoRA, ZeRO-3 partitioned or not) as an HF model directory.

    A collective: every rank calls it with the same arguments (under ZeRO-3 every rank joins each
    group's gather; otherwise only rank 0 reads the full parameters). Only rank 0 touches the
    filesystem. LoRA is detected from the module (peft ``LoraLayer``s) and merged with each
    layer's own ``scaling[adapter]`` (``alpha / r``; ``alpha / sqrt(r)`` under rsLoRA).

    Args:
        module: ``engine.module``: the HF model or the ``PeftModel`` around it.
        out_dir: the run's ``final/``; replaced atomically via ``<out_dir>.partial``.
        tokenizer: saved beside the weights when given.
        zero3: parameters are ZeRO-3 partitioned (``train.zero_stage == 3``).
        is_rank0: this rank writes.
        model_config: the base model's ``PretrainedConfig``; default: ``module``'s (base model's) config.
        lora_scaling: the expected ``alpha / r`` when the run uses LoRA; checked against every peft
            layer's own scaling (which is what is applied), so a config/model disagreement fails loudly.
        max_shard_size: bytes per safetensors file (int, or ``"5GB"``/``"2GiB"``); one file when it all fits.
        layers_per_gather: transformer layers gathered at once (memory of one group vs. collective count).
        adapter: the peft adapter to merge.

    Returns:
        ``ExportInfo`` (same on every rank). Raises on every rank if rank 0 failed.
    """
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    model_config = model_config if model_config is not None else base.config
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    groups = plan_groups(module, num_layers=getattr(text_config, "num_hidden_layers", None),
                         layers_per_gather=layers_per_gather, adapter=adapter)
    specs = [spec for g in groups for spec in g.outs]
    if lora_scaling is not None:
        found = {spec.lora[2] for spec in specs if spec.lora is not None}
        if found != {float(lora_scaling)}:
            raise ValueError(f"export: lora_scaling={lora_scaling} but the model's LoRA layers scale by "
                             f"{sorted(found) or 'nothing (no LoRA layers found)'}")
    shards = plan_shards(specs, parse_size(max_shard_size))
    info = ExportInfo(out_dir, [s.file for s in shards], sum(s.nbytes for s in specs), len(specs), len(groups),
                      max(sum(s.nbytes for s in g.outs) for g in groups))
    partial = out_dir.with_name(out_dir.name + ".partial")
    error: BaseException | None = None
    writer: ShardWriter | None = None
    if is_rank0:
        try:
            shutil.rmtree(partial, ignore_errors=True)  # left by a killed earlier attempt
            partial.mkdir(parents=True)
            writer = ShardWriter(partial, shards)
        except Exception as exc:  # noqa: BLE001 - re-raised after the collectives below
            error = exc
    if zero3 or is_rank0:
        for group in groups:
            with _gathered(list(group.params.values()), zero3):
                if writer is None or error is not None:
                    continue  # keep joining the gathers so the other ranks do not hang
                try:
                    values = {n: p.data for n, p in group.params.items()}
                    for name, tensor in _emit(group, values):
                        writer.write(name, tensor)
                except Exception as exc:  # noqa: BLE001 - re-raised after the collectives below
                    error = exc
    if is_rank0 and error is None:
        assert writer is not None
        try:
            writer.finish()
            if len(shards) > 1:
                index = {"metadata": {"total_size": info.total_bytes,
                                      "total_parameters": sum(s.nbytes // s.dtype.itemsize for s in specs)},
                         "weight_map": {spec.name: s.file for s in shards for spec in s.specs}}
                (partial / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            floats = [s.dtype for s in specs if s.dtype.is_floating_point]
            _write_metadata(partial, base, model_config, tokenizer, max(set(floats), key=floats.count) if floats else None)
            _swap_into_place(partial, out_dir)
        except Exception as exc:  # noqa: BLE001 - re-raised after the collective below
            error = exc
    if is_rank0 and error is not None:
        if writer is not None and writer.fh is not None:
            writer.fh.close()
        shutil.rmtree(partial, ignore_errors=True)  # the previous out_dir, if any, is untouched
    if _any_rank_failed(error is not None):
        if error is not None:
            raise error
        raise RuntimeError(f"export to {out_dir} failed on rank 0 (see its log)")
    return info
