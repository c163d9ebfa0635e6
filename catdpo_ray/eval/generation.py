"""Batched generation for held-out prompts: in-process, or on a Ray Data actor pool.

What is generated (METHOD.md section 6):

- **category prompts**: the unique prompts of the test split, grouped by the harm categories
  flagged on either response of their row (the pair's category set C), at most
  ``eval.max_prompts_per_category`` per category, in file order (no randomness, so two models
  are always scored on the same prompts);
- **benign prompts** for over-refusal: the bundled ``benign.jsonl`` or an XSTest-format file.

How: HF ``model.generate`` on left-padded batches. The prompt is built exactly as in training
(``format_prompt`` + ``encode_prompt``: the same template or chat template, the same BOS rule,
the same left truncation to ``data.max_prompt_length``), so the model is asked in the format it
was aligned in. ``eval.temperature == 0`` is greedy decoding; otherwise sampling with
``eval.top_p``, seeded per batch from ``train.seed`` and the batch's first prompt index.

Where: when Ray is initialised (or ``scaling.ray_address`` / ``$RAY_ADDRESS`` names a cluster),
prompts go through ``map_batches`` on a fixed actor pool (:func:`pool_resources`): ``eval.num_actors``
actors (0 = ``max(1, scaling.num_workers)``), each holding one model replica with
``scaling.cpus_per_worker`` CPUs and ``eval.num_gpus_per_actor`` GPUs (default 1 with
``scaling.use_gpu``, else 0: the same code on CPU actors). With ``eval.device_map: auto`` and more
than one GPU per actor, each replica is spread over its actor's GPUs (a 70B model on 4 or 8 GPUs of
a node; :mod:`catdpo_ray.eval.devices`). Otherwise one in-process :class:`Generator` runs the
batches (with ``device_map: auto``, over every GPU of the machine). On a CPU each generator uses
``scaling.cpus_per_worker`` torch threads: a tiny model's decode steps are overhead-bound, and more
threads than granted cores (a shared box) made them 20x slower in our measurements.

A faster engine (``eval.engine: vllm``): see :mod:`catdpo_ray.eval.vllm_engine`; it takes the same
token ids (built here, so the prompt format is training's) and returns the same response column.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from catdpo_ray.config import RunConfig
from catdpo_ray.eval.devices import HOST, input_device, load_hf_model

#: The bundled benign prompt set (XSTest-style, written for this project).
BUNDLED_BENIGN: Path = Path(__file__).resolve().parents[1] / "data" / "sample" / "benign.jsonl"
#: XSTest ``label`` / ``type`` values that mark a prompt as *not* benign (its unsafe contrast set).
_UNSAFE_LABELS = frozenset({"unsafe", "harmful", "contrast"})


@dataclass(frozen=True)
class PromptItem:
    """One prompt to answer. ``categories`` is empty for a benign prompt."""

    prompt: str
    categories: tuple[str, ...] = ()
    benign: bool = False


def category_prompts(pairs: Iterable[Mapping[str, Any]], categories: Sequence[str], max_per_category: int) -> list[PromptItem]:
    """Unique held-out prompts with their categories, capped per category.

    A prompt enters the set while one of its categories still has room; it then counts for every
    category of its row (a multi-label prompt is generated once and scored in each of its categories).
    A prompt seen in several rows keeps the union of their categories.

    Args:
        pairs: pair records (``prompt`` and multi-hot ``categories``) in file order, e.g. from
            ``load_split(..., pair_mode="helpful")`` (which keeps every valid row).
        categories: the run's category names (multi-hot order).
        max_per_category: cap per category; ``<= 0`` keeps every prompt.

    Returns:
        Prompt items in first-seen order; rows without any category are skipped.
    """
    merged: dict[str, set[str]] = {}
    for pair in pairs:
        cats = {categories[k] for k, flag in enumerate(pair["categories"]) if flag}
        if cats:
            merged.setdefault(str(pair["prompt"]), set()).update(cats)
    counts = dict.fromkeys(categories, 0)
    items: list[PromptItem] = []
    for prompt, cats in merged.items():
        if max_per_category > 0 and all(counts[c] >= max_per_category for c in cats):
            continue
        for c in cats:
            counts[c] += 1
        items.append(PromptItem(prompt, tuple(c for c in categories if c in cats)))
    return items


def _is_benign_record(record: Mapping[str, Any]) -> bool:
    """XSTest rows: ``label`` is ``safe``/``unsafe`` (v2); v1 marks unsafe rows by a ``contrast_*`` type."""
    label = str(record.get("label") or "").strip().lower()
    kind = str(record.get("type") or "").strip().lower()
    return label not in _UNSAFE_LABELS and not kind.startswith("contrast")


def load_benign(spec: str) -> list[PromptItem]:
    """Benign prompts for over-refusal from ``bundled`` or an XSTest-format ``.csv``/``.jsonl``.

    A file needs a ``prompt`` column; rows whose ``label`` is ``unsafe`` (XSTest v2) or whose
    ``type`` starts with ``contrast`` (XSTest v1) are the unsafe contrast prompts and are skipped.
    """
    path = BUNDLED_BENIGN if spec == "bundled" else Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"eval.benign: {path} does not exist")
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            records: list[dict[str, Any]] = list(csv.DictReader(fh))
    else:
        with path.open(encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh if line.strip()]
    if records and "prompt" not in records[0]:
        raise ValueError(f"eval.benign: {path} has no 'prompt' column (columns: {sorted(records[0])})")
    return [PromptItem(str(r["prompt"]).strip(), (), True) for r in records if _is_benign_record(r) and str(r["prompt"]).strip()]


class Generator:
    """One model copy that answers prompts; also the callable class of the Ray Data actor pool.

    Args:
        model_path: HF causal-LM directory or hub id.
        tokenizer_path: tokenizer directory or hub id (usually ``model_path``).
        prompt_template: ``data.prompt_template`` (``{prompt}`` is substituted).
        use_chat_template: ``data.use_chat_template``.
        max_prompt_length: prompts are cut from the left to this many tokens (as in training).
        max_new_tokens / temperature / top_p: sampling settings (``temperature == 0``: greedy).
        seed: base seed of sampling.
        bf16: load in bfloat16 (only used on a GPU).
        trust_remote_code: passed to ``from_pretrained``.
        num_threads: torch intra-op threads on a CPU (``scaling.cpus_per_worker``); None leaves torch's.
        device_map: ``eval.device_map`` (``None``: one device; ``"auto"``: every GPU this process sees).
    """

    def __init__(self, model_path: str, tokenizer_path: str, *, prompt_template: str, use_chat_template: bool,
                 max_prompt_length: int, max_new_tokens: int, temperature: float, top_p: float, seed: int = 0,
                 bf16: bool = False, trust_remote_code: bool = False, num_threads: int | None = None,
                 device_map: str | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust_remote_code)
        self.model = load_hf_model(AutoModelForCausalLM, model_path, device_map=device_map, bf16=bf16,
                                   trust_remote_code=trust_remote_code)
        self.device = input_device(self.model)
        if self.device.type == "cpu" and num_threads:
            # Small decode steps on a shared CPU: more intra-op threads than cores granted is far slower.
            torch.set_num_threads(num_threads)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.template, self.use_chat_template = prompt_template, use_chat_template
        self.max_prompt_length, self.max_new_tokens = max_prompt_length, max_new_tokens
        self.temperature, self.top_p, self.seed = temperature, top_p, seed

    def encode(self, prompt: str) -> list[int]:
        """Prompt token ids exactly as training builds them (template, BOS rule, left truncation)."""
        from catdpo_ray.data.tokenize import encode_prompt, format_prompt

        text = format_prompt(self.tokenizer, prompt, template=self.template, use_chat_template=self.use_chat_template)
        return encode_prompt(self.tokenizer, text, use_chat_template=self.use_chat_template)[-self.max_prompt_length :]

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, first_index: int = 0) -> list[str]:
        """Responses to ``prompts`` (one left-padded batch); special tokens are stripped."""
        encoded = [self.encode(p) for p in prompts]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, ids in enumerate(encoded):  # left padding: every prompt ends where generation starts
            input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[i, width - len(ids) :] = 1
        sampling = self.temperature > 0
        kwargs: dict[str, Any] = {"do_sample": sampling, "max_new_tokens": self.max_new_tokens,
                                  "pad_token_id": self.pad_id, "eos_token_id": self.tokenizer.eos_token_id}
        if sampling:
            torch.manual_seed(self.seed * 1_000_003 + first_index)
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        else:  # greedy; drop sampling defaults a generation_config may carry
            kwargs.update(temperature=None, top_p=None, top_k=None)
        out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device), **kwargs)
        return [t.strip() for t in self.tokenizer.batch_decode(out[:, width:].to(HOST), skip_special_tokens=True)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data ``map_batches`` entry: columns ``index``, ``prompt`` -> plus ``response``."""
        prompts = [str(p) for p in batch["prompt"]]
        first = int(np.min(batch["index"])) if len(prompts) else 0
        return {"index": np.asarray(batch["index"]), "response": np.asarray(self.generate(prompts, first_index=first), dtype=object)}


def generator_kwargs(cfg: RunConfig, model_path: str, tokenizer_path: str) -> dict[str, Any]:
    """:class:`Generator` constructor arguments from the config (one place for both backends)."""
    return {
        "model_path": model_path, "tokenizer_path": tokenizer_path,
        "prompt_template": cfg.data.prompt_template, "use_chat_template": cfg.data.use_chat_template,
        "max_prompt_length": cfg.data.max_prompt_length, "max_new_tokens": cfg.eval.max_new_tokens,
        "temperature": cfg.eval.temperature, "top_p": cfg.eval.top_p, "seed": cfg.train.seed,
        "bf16": cfg.train.precision == "bf16", "trust_remote_code": cfg.model.trust_remote_code,
        "num_threads": max(1, int(cfg.scaling.cpus_per_worker)), "device_map": cfg.eval.device_map,
    }


def use_ray_backend(cfg: RunConfig) -> bool:
    """Ray Data when Ray is already up or a cluster address is configured; else in-process."""
    from catdpo_ray.ray_session import ray_wanted

    return ray_wanted(cfg)


@dataclass(frozen=True)
class PoolResources:
    """The generation actor pool: ``actors`` replicas, each with ``cpus`` CPUs and ``gpus`` GPUs."""

    actors: int
    cpus: float
    gpus: float


def pool_resources(cfg: RunConfig) -> PoolResources:
    """Actors and per-actor resources from ``eval.num_actors``, ``eval.num_gpus_per_actor`` and ``scaling``.

    Raises:
        ValueError: a negative count, or a fractional GPU count above 1 (Ray grants whole GPUs beyond one).
    """
    e = cfg.eval
    actors = e.num_actors if e.num_actors > 0 else max(1, cfg.scaling.num_workers)
    gpus = e.num_gpus_per_actor if e.num_gpus_per_actor is not None else (1.0 if cfg.scaling.use_gpu else 0.0)
    if e.num_actors < 0 or gpus < 0:
        raise ValueError(f"eval.num_actors={e.num_actors}, eval.num_gpus_per_actor={gpus}: must be >= 0")
    if gpus > 1 and gpus != int(gpus):
        raise ValueError(f"eval.num_gpus_per_actor={gpus}: above 1 it must be a whole number of GPUs")
    return PoolResources(actors=actors, cpus=float(cfg.scaling.cpus_per_worker), gpus=float(gpus))


def _generate_ray(cfg: RunConfig, kwargs: dict[str, Any], prompts: Sequence[str]) -> list[str]:
    import ray
    import ray.data

    from catdpo_ray.ray_session import init_ray

    init_ray(cfg)  # a no-op when Ray is up
    res = pool_resources(cfg)
    ds = ray.data.from_items([{"index": i, "prompt": p} for i, p in enumerate(prompts)],
                             override_num_blocks=max(1, min(len(prompts), res.actors * 2)))
    out = ds.map_batches(
        Generator,
        fn_constructor_kwargs=kwargs,
        batch_size=cfg.eval.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=res.actors),
        num_cpus=res.cpus,
        num_gpus=res.gpus,
    )
    return collect_responses(out.iter_rows(), len(prompts))


def collect_responses(rows: Iterable[Mapping[str, Any]], n: int) -> list[str]:
    """Rows with ``index`` and ``response`` (any order) -> the ``n`` responses in prompt order."""
    responses: list[str | None] = [None] * n
    for row in rows:
        responses[int(row["index"])] = str(row["response"])
    missing = [i for i, r in enumerate(responses) if r is None]
    if missing:
        raise RuntimeError(f"Ray Data generation returned no response for {len(missing)} prompts (first: {missing[0]})")
    return [str(r) for r in responses]


def generate_responses(cfg: RunConfig, model_path: str, prompts: Sequence[str], *, tokenizer_path: str | None = None,
                       backend: str = "auto") -> tuple[list[str], str]:
    """Answer every prompt; returns (responses in prompt order, backend used).

    Args:
        cfg: the run/eval config (``data`` prompt format, ``eval`` sampling, ``scaling`` pool).
        model_path: the model to generate with.
        prompts: raw user prompts (the template is applied here).
        tokenizer_path: defaults to ``model_path``.
        backend: ``auto`` (see :func:`use_ray_backend`), ``ray`` or ``local``; ``eval.engine: vllm``
            always runs on Ray (:mod:`catdpo_ray.eval.vllm_engine`).
    """
    if backend not in ("auto", "ray", "local"):
        raise ValueError(f"backend {backend!r}: choose auto, ray or local")
    if not prompts:
        return [], "none"
    kwargs = generator_kwargs(cfg, model_path, tokenizer_path or model_path)
    if cfg.eval.engine == "vllm":
        from catdpo_ray.eval.vllm_engine import generate_vllm

        return generate_vllm(cfg, kwargs, prompts), "ray-data-vllm"
    if backend == "ray" or (backend == "auto" and use_ray_backend(cfg)):
        return _generate_ray(cfg, kwargs, prompts), "ray-data"
    threads = torch.get_num_threads()
    try:
        gen = Generator(**kwargs)
        step = cfg.eval.batch_size
        responses: list[str] = []
        for start in range(0, len(prompts), step):
            responses += gen.generate(list(prompts[start : start + step]), first_index=start)
    finally:
        torch.set_num_threads(threads)  # the caller's process keeps its own setting
    return responses, "in-process"
