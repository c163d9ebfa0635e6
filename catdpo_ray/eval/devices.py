"""Where the evaluation's models and tensors live: one place for every HF model the evaluation loads.

Rules (issue 9, "Evaluation that scales"):

- :func:`accelerator` is the device of this process: ``cuda:<current>`` when a GPU is visible (in a
  Ray actor, the GPUs Ray granted it), else the CPU.
- :func:`load_hf_model` loads a policy, reference, classifier or reward model either whole onto that
  device (``eval.device_map = null``) or, with ``eval.device_map = "auto"`` and a GPU, spread by
  accelerate over every GPU the process sees, for models larger than one GPU. On a CPU both are the
  CPU, exactly as before.
- Model inputs go to :func:`input_device` (the input embeddings' device: with a device map, the
  first GPU); accelerate's hooks carry activations from GPU to GPU; the logits come out on the
  *last* GPU. :func:`sequence_logps_of` therefore scores the logits where they are and hands the
  per-sequence results ([N] vectors, a few bytes) back to the host, where the per-category
  bookkeeping (category mask, safety flags) stays. Nothing else crosses devices.

:mod:`catdpo_ray.eval.devicecheck` checks these rules on a CPU-only machine. Imports only torch
(transformers lazily, inside :func:`load_hf_model`).
"""

from __future__ import annotations

from typing import Any

import torch

from catdpo_ray.losses import sequence_logps

HOST = torch.device("cpu")


def accelerator() -> torch.device:
    """The device this process evaluates on: the current CUDA device when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return HOST


def load_hf_model(auto_class: Any, path: str, *, device_map: str | None = None, bf16: bool = False,
                  trust_remote_code: bool = False) -> torch.nn.Module:
    """``auto_class.from_pretrained(path)`` placed by the rules above, in eval mode.

    Args:
        auto_class: e.g. ``transformers.AutoModelForCausalLM`` or ``AutoModelForSequenceClassification``.
        path: model directory or hub id.
        device_map: ``None`` (one device) or ``"auto"`` (accelerate, only when the accelerator is a GPU).
        bf16: load in bfloat16 on a GPU (``train.precision == "bf16"``); always float32 on the CPU.
        trust_remote_code: passed through; the caller decides (never enabled here).
    """
    device = accelerator()
    dtype = torch.bfloat16 if bf16 and device.type == "cuda" else torch.float32
    if device_map == "auto" and device.type == "cuda":
        # accelerate assigns whole decoder layers to GPUs in order, filling each before the next.
        model = auto_class.from_pretrained(path, dtype=dtype, device_map="auto", trust_remote_code=trust_remote_code)
    else:
        model = auto_class.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code).to(device)
    return model.eval()


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a model's ``input_ids``/``attention_mask`` go: the device of its input embeddings."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    return next(model.parameters()).device


@torch.no_grad()
def sequence_logps_of(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the masked tokens of each sequence, and their token counts, on the host.

    Args:
        model: a causal LM (one device or a device map).
        input_ids: ``[N, T]`` token ids, on any device.
        attention_mask: ``[N, T]``.
        loss_mask: ``[N, T]``, 1 on the response tokens that are scored.

    Returns:
        ``(logps [N], counts [N])`` (float32 for float32/bf16 logits) on the CPU (:func:`catdpo_ray.losses.sequence_logps`).
    """
    dev = input_device(model)
    ids = input_ids.to(dev)
    logits = model(input_ids=ids, attention_mask=attention_mask.to(dev)).logits
    # With a device map the logits sit on the last GPU: score them there, not on the first.
    logps, counts = sequence_logps(logits, ids.to(logits.device), loss_mask.to(logits.device))
    return logps.cpu(), counts.cpu()
