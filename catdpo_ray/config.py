"""Typed, frozen run configuration: YAML file + dotted ``key=value`` overrides.

One source of truth. Every other module receives a :class:`RunConfig` (or one of its
sections); nothing downstream re-reads raw dicts. Unknown keys, wrong types and impossible
combinations fail here, at load time, with a message naming the key and the valid choices.

Example::

    cfg = load_config("jobs/tiny_cpu.yaml", ["loss.beta=0.2", "dual.eta=0.25"])
    cfg.dual.eta  # 0.25

The DeepSpeed dict and the batch arithmetic (micro x accumulation x workers = global) are
derived from this config in exactly one place: :func:`catdpo_ray.train.ds_config.build_ds_config`
and :meth:`RunConfig.global_batch_size`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from catdpo_ray.config_build import ConfigError, apply_overrides, build_dataclass

#: The 19 harm categories of PKU-SafeRLHF, spelled exactly as the dataset spells them.
PKU_CATEGORIES: tuple[str, ...] = (
    "Animal Abuse",
    "Copyright Issues",
    "Cybercrime",
    "Discriminatory Behavior",
    "Disrupting Public Order",
    "Drugs",
    "Economic Crime",
    "Endangering National Security",
    "Endangering Public Health",
    "Environmental Damage",
    "Human Trafficking",
    "Insulting Behavior",
    "Mental Manipulation",
    "Physical Harm",
    "Privacy Violation",
    "Psychological Harm",
    "Sexual Content",
    "Violence",
    "White-Collar Crime",
)

LossName = Literal["dpo", "ipo", "simpo", "safedpo", "catdpo", "bdpo"]
PairMode = Literal["auto", "helpful", "harmless", "safe_better", "safety_aware"]

#: Pair construction used when ``data.pairs=auto`` (METHOD.md section 1 "used by").
DEFAULT_PAIRS_FOR_LOSS: dict[str, str] = {
    "dpo": "safe_better",
    "ipo": "safe_better",
    "simpo": "safe_better",
    "bdpo": "harmless",
    "safedpo": "safety_aware",
    "catdpo": "safety_aware",
}



@dataclass(frozen=True)
class LoraConfig:
    """peft LoRA on the policy. With LoRA the reference is the base model (adapter disabled)."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    #: Module names to adapt; the Llama/Qwen attention and MLP projections by default.
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass(frozen=True)
class ModelConfig:
    """The policy and its reference: precomputed reference log-probs (a cached Ray Data stage,
    ``catdpo_ray.data.reference``), or online a frozen DeepSpeed engine of the same weights, or
    with LoRA the same engine with the adapter disabled."""

    #: HF hub id or local directory of a causal LM, or ``tiny`` for the bundled tiny Llama
    #: (built on first use from the bundled corpus, cached, then loaded via from_pretrained).
    name_or_path: str = "tiny"
    revision: str | None = None
    #: ``auto`` = the tokenizer of ``name_or_path``; a path/id to override.
    tokenizer: str = "auto"
    trust_remote_code: bool = False
    #: Attention kernel passed to from_pretrained (``sdpa``, ``eager``, ``flash_attention_2``).
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    #: Where the tiny model and tokenizer are cached (``~/.cache/catdpo_ray`` by default,
    #: or ``$CATDPO_CACHE``).
    cache_dir: str | None = None
    #: Reference log-probs: ``precompute`` (every pair scored once with the reference, on a Ray Data
    #: actor pool on GPUs, in the driver on CPUs; cached on disk; workers load no reference model),
    #: ``online`` (a frozen reference forward every micro-batch), ``auto`` = precompute when the loss
    #: uses a reference; losses without one (``simpo``) build none whatever this says.
    reference: Literal["auto", "precompute", "online"] = "auto"
    #: Cache of precomputed reference log-probs, one entry per fingerprint of weights, tokenizer,
    #: tokenized pairs, lengths, template and dtype. Default ``<model.cache_dir>/reference_cache``
    #: (``~/.cache/catdpo_ray/reference_cache``). On a multi-node cluster use shared storage
    #: (NFS, a mounted bucket) so every node and later runs see the same entries.
    reference_cache_dir: str | None = None


@dataclass(frozen=True)
class DataConfig:
    """Preference data: source, schema mapping, validation, pair construction, tokenization."""

    #: ``bundled`` (the shipped sample corpus), or a PKU-schema ``.jsonl``/``.json``/``.parquet`` path.
    train: str = "bundled"
    test: str = "bundled"
    #: HF hub dataset (e.g. ``PKU-Alignment/PKU-SafeRLHF``); when set, it replaces train/test.
    hub_name: str | None = None
    hub_config: str | None = "default"
    hub_train_split: str = "train"
    hub_test_split: str = "test"
    hub_revision: str | None = None
    #: PKU field name -> source column name, for corpora with other column names.
    column_map: dict[str, str] = field(default_factory=dict)
    #: The run's harm categories (multi-hot order). Default: the 19 PKU names.
    categories: list[str] = field(default_factory=lambda: list(PKU_CATEGORIES))
    #: Pair construction (METHOD.md section 1); ``auto`` picks per loss.
    pairs: PairMode = "auto"
    #: ``strict``: first bad row raises; ``lenient``: bad rows go to quarantine.jsonl, counted.
    validation: Literal["strict", "lenient"] = "lenient"
    #: Exact duplicate rows (every field equal to an earlier row of the same split): ``drop`` them
    #: (counted as ``dropped:duplicate``) or ``keep`` them as extra pairs; counted either way.
    duplicates: Literal["keep", "drop"] = "drop"
    #: Prompt template for models without a chat template; ``{prompt}`` is substituted.
    prompt_template: str = "USER: {prompt} ASSISTANT:"
    #: Use the tokenizer's chat template (instruct models) instead of ``prompt_template``.
    use_chat_template: bool = False
    max_length: int = 128
    max_prompt_length: int = 64
    #: Cap on training rows read (``null`` = all); for smoke runs.
    max_train_rows: int | None = None
    max_test_rows: int | None = None


@dataclass(frozen=True)
class LossConfig:
    """The preference loss (METHOD.md section 3)."""

    name: LossName = "catdpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    #: SafeDPO fixed safety margin Delta (Kim et al., ICLR 2026).
    delta: float = 10.0
    #: SimPO target reward margin gamma (Meng et al., 2024).
    simpo_gamma: float = 0.5
    #: B-DPO softmax temperature tau over mutual information (derived template).
    bdpo_tau: float = 1.0


@dataclass(frozen=True)
class DualConfig:
    """Per-category dual variables lambda_k and their projected ascent (METHOD.md section 4)."""

    eta: float = 0.5
    #: Violation tolerance: one float, or one per category (same order as data.categories).
    epsilon: float | list[float] = 0.02
    lambda_init: float | list[float] = 0.0
    lambda_max: float = 100.0
    update_every: int = 1
    #: Every N optimizer steps the workers all-gather the lambda they hold and refuse to go on unless it is
    #: bit-identical on every rank (digests in the step row). Rank 0 broadcasts lambda every step, so this
    #: verifies rather than synchronises; 1 = every step (one more collective per step, ~0.4 ms on 2 CPU
    #: workers with gloo).
    check_every: int = 10
    #: Violation estimate fed to the dual update. Offline, from the training batch's safe-vs-unsafe
    #: pairs: ``soft`` sigma(-beta Delta), ``hard`` 1[beta Delta <= 0], ``likelihood`` (METHOD.md
    #: section 4). On-policy: ``generation`` = unsafe answers among the policy's own samples on
    #: training prompts of each category, judged every ``generation_every`` steps (other steps feed
    #: n = v = 0: lambda holds); ``blend`` = n_k = n_off_k, v_k = (1 - w) v_off_k + w g_k n_off_k
    #: with w = ``blend_weight`` and g_k the latest judged unsafe rate of category k (held between
    #: rounds, checkpointed; v_off_k alone until category k was first judged), so the window rate is
    #: (1 - w) offline rate + w on-policy rate.
    violation: Literal["soft", "hard", "likelihood", "generation", "blend"] = "soft"
    #: Margin aggregation m(C) over a pair's categories.
    agg: Literal["sum", "mean", "max", "binding"] = "sum"
    #: violation=generation/blend: sample and judge every this many optimizer steps.
    generation_every: int = 10
    #: Prompts drawn per category per round (seeded by train.seed and the step; split across ranks).
    generation_prompts_per_category: int = 4
    #: Training prompts per category kept in the pool the rounds draw from (built once by the driver).
    generation_pool_per_category: int = 64
    #: New tokens per sampled answer.
    generation_max_new_tokens: int = 32
    #: Sampling temperature of the policy's answers (0 = greedy).
    generation_temperature: float = 1.0
    #: Prompts per generate call on each rank.
    generation_batch_size: int = 32
    #: Judge of the sampled answers, configured like ``catdpo-ray eval``'s (``eval.classifier_*``, ``eval.llm_*``).
    generation_judge: Literal["rule", "classifier", "llm"] = "rule"
    #: violation=blend: weight w of the on-policy rate; also the offline signal blended with it.
    blend_weight: float = 0.5
    blend_offline: Literal["soft", "hard", "likelihood"] = "soft"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation. DeepSpeed's dict is derived from these in train/ds_config.py only."""

    seed: int = 0
    #: Shuffle the training pairs: once on the driver (``Random(seed)``, before tokenization), then each
    #: epoch inside every worker's local buffer (seeded by seed, epoch, rank). Off = file order.
    shuffle: bool = True
    #: Pairs per worker in the per-epoch local shuffle buffer.
    shuffle_buffer: int = 1024
    #: Length-grouped micro-batches: the pairs of each window of this many micro-batches are sorted by
    #: length and the resulting micro-batches shuffled (seeded), so similar lengths share one (less
    #: padding); step counts and the resume position are unchanged. 0 = off.
    length_grouping: int = 0
    #: Padding-free micro-batches: chosen and rejected sequences packed into rows with position ids
    #: restarting per sequence (same log-probs). ``auto`` packs when the attention implementation
    #: isolates packed sequences (sdpa, eager, flex_attention, flash_attention_2/3/4) and pads otherwise;
    #: ``on`` refuses a model that cannot; ``off`` always pads.
    packing: Literal["auto", "on", "off"] = "auto"
    epochs: int = 1
    #: Stop after this many optimizer steps (``null`` = full epochs).
    max_steps: int | None = None
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16"] = "fp32"
    offload_optimizer: bool = False
    offload_param: bool = False
    #: ``torch``: torch.optim.AdamW handed to DeepSpeed (no C++ JIT build, the CPU default);
    #: ``deepspeed``: DeepSpeed's fused/CPU Adam (GPU clusters, offload).
    optimizer: Literal["auto", "torch", "deepspeed"] = "auto"
    log_every: int = 1
    #: Held-out evaluation every N optimizer steps (0 = only at the end).
    eval_every: int = 0
    #: Checkpoint every N optimizer steps (0 = only at the end).
    checkpoint_every: int = 0
    #: Stop (simulating a failure) after this step's checkpoint; for resume tests.
    stop_after_step: int | None = None
    #: Evaluate the reference and the policy on the held-out split (before/after table).
    eval_before_after: bool = True


@dataclass(frozen=True)
class ScalingConfig:
    """Ray Train workers. ``num_workers=0`` is Ray Train local mode (in-process, no collectives)."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    #: Connect here instead of $RAY_ADDRESS / a fresh local cluster.
    ray_address: str | None = None
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    #: Before a GPU run starts workers the driver plans its memory (``catdpo-ray plan``) and
    #: ``refuse``s a job that does not fit, printing the plan and the smallest change that fits;
    #: ``warn`` prints the plan and goes on; ``off`` skips it.
    plan_check: Literal["refuse", "warn", "off"] = "refuse"


@dataclass(frozen=True)
class OutputConfig:
    """Where the run directory and Ray's storage live."""

    dir: str = "runs"
    #: Run name; ``null`` = ``<loss>-<UTC time>-<random>`` (unique). Same name = resume.
    name: str | None = None
    #: Ray Train storage (checkpoints); ``null`` = ``<dir>/ray_storage``. Shared on multi-node.
    storage_path: str | None = None
    num_checkpoints_to_keep: int = 2
    max_failures: int = 0
    save_final: bool = True
    #: Largest safetensors shard of the exported ``final/`` (e.g. ``5GB``, ``2GiB``); more shards get an index.
    max_shard_size: str = "5GB"


@dataclass(frozen=True)
class LoggingConfig:
    """Metric sinks beyond metrics.jsonl."""

    tensorboard: bool = True
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "catdpo-ray"
    wandb_project: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation: offline preference accuracy and generation + judges (METHOD.md section 6)."""

    #: Judges for generation-based safe ratio: any of ``rule``, ``classifier``, ``llm``.
    judges: list[str] = field(default_factory=lambda: ["rule"])
    generate: bool = True
    max_new_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 1.0
    batch_size: int = 32
    max_prompts_per_category: int = 20
    #: Classifier judge: HF sequence-classification / score model; cost > threshold = unsafe.
    classifier_model: str | None = None
    classifier_threshold: float = 0.0
    classifier_higher_is_unsafe: bool = True
    #: Input text of the classifier and reward models; PKU beaver models' conversation format.
    classifier_template: str = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}"
    #: Helpfulness reward model (HF sequence-classification / score model, higher = more helpful).
    reward_model: str | None = None
    #: LLM judge over an OpenAI-compatible endpoint; key read from this environment variable.
    llm_base_url: str | None = None
    llm_model: str = "gpt-4.1"
    llm_api_key_env: str = "OPENAI_API_KEY"
    llm_timeout_s: float = 60.0
    #: Send the LLM judge's key to a plain-HTTP URL that is not loopback (127.0.0.0/8, ::1, localhost).
    #: Off: such a URL is refused before any request is made. Taken only from a config the user named.
    allow_insecure_key: bool = False
    #: Generation engine: ``hf`` (transformers ``generate``; Ray Data actor pool or in-process) or ``vllm``
    #: (``ray.data.llm`` + vLLM on GPUs; ``pip install 'catdpo-ray[vllm]'``, never a hard dependency).
    engine: Literal["hf", "vllm"] = "hf"
    #: Placement of every HF model of the evaluation (policy, reference, classifier, reward model):
    #: ``null`` = one device (the GPU when there is one, else the CPU); ``auto`` = accelerate spreads one
    #: model over every GPU the process sees (a node's GPUs in-process; an actor's ``num_gpus_per_actor``
    #: GPUs on Ray), for models larger than one GPU. Without a GPU both mean the CPU.
    device_map: Literal["auto"] | None = None
    #: Generation actors, one model replica each; 0 = max(1, scaling.num_workers).
    num_actors: int = 0
    #: GPUs per generation actor (vLLM: the tensor-parallel size); null = 1 with scaling.use_gpu, else 0.
    num_gpus_per_actor: float | None = None
    #: Extra ``vllm`` engine arguments (e.g. ``max_model_len``, ``gpu_memory_utilization``).
    vllm_engine_kwargs: dict[str, Any] = field(default_factory=dict)
    #: Benign prompts for over-refusal: ``bundled`` or an XSTest-format CSV/JSONL path.
    benign: str = "bundled"
    #: Reference model for implicit-reward accuracy (``null`` = the training config's model).
    reference_model: str | None = None
    output_dir: str | None = None


@dataclass(frozen=True)
class TuneConfig:
    """Ray Tune sweep over dual.eta x dual.epsilon (and any other key)."""

    eta: list[float] = field(default_factory=lambda: [0.25, 1.0])
    epsilon: list[float] = field(default_factory=lambda: [0.02, 0.1])
    #: Extra sweep axes: dotted key -> list of values (grid).
    extra: dict[str, list[Any]] = field(default_factory=dict)
    search: Literal["grid", "random", "optuna"] = "grid"
    #: Trials for random/optuna search (grid: repeats of the full grid).
    num_samples: int = 1
    asha: bool = True
    asha_grace_period: int = 2
    objective: str = "eval/worst3"
    mode: Literal["max", "min"] = "max"
    #: Helpfulness guard: trials whose eval/helpful_acc falls below this are marked infeasible.
    helpfulness_floor: float = 0.0
    #: 0 = derive from cluster resources / workers per trial.
    max_concurrent: int = 0
    name: str | None = None


@dataclass(frozen=True)
class RunConfig:
    """The whole run. ``load_config`` builds it; sections are frozen."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    dual: DualConfig = field(default_factory=DualConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    # ---- derived quantities (the one place they are computed) ----
    @property
    def data_parallel_size(self) -> int:
        """Number of data-parallel ranks (local mode counts as one)."""
        return max(1, self.scaling.num_workers)

    @property
    def global_batch_size(self) -> int:
        """Pairs per optimizer step = micro x accumulation x workers."""
        return self.train.micro_batch_size * self.train.grad_accum * self.data_parallel_size

    @property
    def pair_mode(self) -> str:
        """Resolved pair construction mode."""
        return DEFAULT_PAIRS_FOR_LOSS[self.loss.name] if self.data.pairs == "auto" else self.data.pairs

    @property
    def num_categories(self) -> int:
        return len(self.data.categories)

    def per_category(self, value: float | list[float]) -> list[float]:
        """Broadcast a scalar-or-list dual option to one float per category."""
        if isinstance(value, list):
            return [float(v) for v in value]
        return [float(value)] * self.num_categories

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, overrides: dict[str, Any] | list[str]) -> RunConfig:
        """A new validated config with dotted overrides applied."""
        raw = self.to_dict()
        apply_overrides(raw, overrides)
        return from_dict(raw)


# ---------------------------------------------------------------------------------------------
# loading


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a nested dict (missing keys = defaults)."""
    cfg = build_dataclass(RunConfig, raw or {})
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load YAML (optional) and apply dotted ``key=value`` overrides, then validate."""
    import yaml

    raw: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        loaded = yaml.safe_load(text)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        raw = loaded or {}
    base = from_dict(raw).to_dict()
    apply_overrides(base, overrides or [])
    return from_dict(base)


def validate(cfg: RunConfig) -> None:
    """Ranges (:func:`check_ranges`), then cross-field checks that a type cannot express."""
    from catdpo_ray.config_ranges import check_ranges

    k = cfg.num_categories
    if k == 0:
        raise ConfigError("data.categories: at least one category is required")
    if len(set(cfg.data.categories)) != k:
        raise ConfigError("data.categories: category names must be unique")
    for name in ("epsilon", "lambda_init"):
        value = getattr(cfg.dual, name)
        if isinstance(value, list) and len(value) != k:
            raise ConfigError(
                f"dual.{name}: a list must have one value per category ({k} in data.categories), got {len(value)}"
            )
    check_ranges(cfg)
    for i, v in enumerate(cfg.per_category(cfg.dual.lambda_init)):
        if not (math.isfinite(v) and 0.0 <= v <= cfg.dual.lambda_max):
            where = "dual.lambda_init" if not isinstance(cfg.dual.lambda_init, list) else f"dual.lambda_init[{i}]"
            raise ConfigError(f"{where}: {v} is outside [0, dual.lambda_max={cfg.dual.lambda_max}]")
    if cfg.data.max_prompt_length >= cfg.data.max_length:
        raise ConfigError(
            f"data.max_prompt_length must be smaller than data.max_length "
            f"(got {cfg.data.max_prompt_length} >= {cfg.data.max_length}): a response needs at least one token"
        )
    if cfg.loss.name in ("catdpo", "safedpo") and cfg.pair_mode != "safety_aware":
        raise ConfigError(
            f"data.pairs={cfg.data.pairs!r} with loss.name={cfg.loss.name!r}: the safety margin needs "
            "safety_gap, which only 'safety_aware' pairs define meaningfully; use data.pairs=safety_aware or auto"
        )
    if cfg.train.offload_param and cfg.train.zero_stage != 3:
        raise ConfigError("train.offload_param needs train.zero_stage=3")
    if cfg.train.offload_optimizer and cfg.train.zero_stage == 0:
        raise ConfigError("train.offload_optimizer needs train.zero_stage >= 1")
    if cfg.scaling.use_gpu and cfg.scaling.num_workers == 0:
        raise ConfigError("scaling.use_gpu with num_workers=0 (local mode) is not supported; use >= 1 worker")
    unknown_judges = sorted(set(cfg.eval.judges) - {"rule", "classifier", "llm"})
    if unknown_judges:
        raise ConfigError(f"eval.judges: unknown judge {unknown_judges[0]!r}; choose from ['classifier', 'llm', 'rule']")
    if "classifier" in cfg.eval.judges and not cfg.eval.classifier_model:
        raise ConfigError("eval.judges has 'classifier' but eval.classifier_model is not set")
    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*([KMGT]i?B|B)?\s*", cfg.output.max_shard_size):
        raise ConfigError(f"output.max_shard_size: {cfg.output.max_shard_size!r} is not a size like 5GB, 2GiB or 500MB")
    if cfg.dual.violation in ("generation", "blend"):
        if cfg.dual.generation_judge == "classifier" and not cfg.eval.classifier_model:
            raise ConfigError("dual.generation_judge=classifier needs eval.classifier_model")
        if cfg.dual.generation_judge == "llm" and not cfg.eval.llm_base_url:
            raise ConfigError("dual.generation_judge=llm needs eval.llm_base_url")
    if "llm" in cfg.eval.judges and not cfg.eval.llm_base_url:
        raise ConfigError("eval.judges has 'llm' but eval.llm_base_url is not set")


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (what ``config.yaml`` in a run directory holds)."""
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


__all__ = [
    "PKU_CATEGORIES",
    "ConfigError",
    "RunConfig",
    "load_config",
    "from_dict",
    "to_yaml",
]
