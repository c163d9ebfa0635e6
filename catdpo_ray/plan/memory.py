"""Per-device and per-host memory of one training worker: pure arithmetic over a :class:`ModelShape`.

Conventions (bytes; ``P`` all parameters, ``P_t`` trainable ones (``P``, or the LoRA adapters),
``N`` data-parallel ranks, ``d`` bytes of the model dtype: 2 for ``bf16``, 4 for ``fp32``):

* **Model states follow what DeepSpeed 0.19 allocates**, the same accounting as its estimators
  ``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``
  (Rajbhandari et al. 2020, "ZeRO", with DeepSpeed's fp32 gradient partition added):

  ========  =========================  ===============================  ==========================
  stage     parameters                 gradients                        optimizer (fp32 master+Adam)
  ========  =========================  ===============================  ==========================
  0 bf16    ``2P``                     ``2P_t + 4P_t`` (BF16_Optimizer   ``12 P_t``
                                       accumulates in fp32)
  1 bf16    ``2P``                     ``2P_t + 4P_t/N``                ``12 P_t / N``
  2 bf16    ``2P``                     ``2P_t/N + 4P_t/N``              ``12 P_t / N``
  3 bf16    ``2P/N``                   ``2P_t/N + 4P_t/N``              ``12 P_t / N``
  0 fp32    ``4P``                     ``4P_t``                         ``8 P_t`` (no master copy)
  1 fp32    ``4P``                     ``4P_t + 4P_t/N``                ``12 P_t / N`` (ZeRO clones
  2 fp32    ``4P``                     ``8P_t/N``                       a fp32 partition)
  3 fp32    ``4P/N``                   ``8P_t/N``                       ``12 P_t / N``
  ========  =========================  ===============================  ==========================

  ZeRO-3 adds the *gathered working set*: the largest module gathered in full plus the next one
  prefetched, ``2 d L`` (``L`` = parameters of the largest module; DeepSpeed's ``4 L`` in bf16),
  and the *retained* gathered parameters: DeepSpeed does not release a gathered parameter whose
  next use is within ``stage3_max_reuse_distance`` (1e9 elements) and keeps up to
  ``stage3_max_live_parameters`` (1e9) resident, so after the first (tracing) step
  ``d min(P, 1e9)`` stay gathered on every rank (the whole model below 1e9 parameters), the ``2 d L``
  included. Its estimators leave this out; the CPU measurements in ``benchmarks/README.md`` show it.
  An online ZeRO-3 reference engine retains its own ``d min(P, 1e9)``.
  The ``4P_t/N`` fp32 gradient of ZeRO-3 exists only during ``optimizer.step``; it is counted
  as if it coincided with the activations (conservative; DeepSpeed's ZeRO-3 estimator counts
  ``18 P/N`` where this counts ``20 P/N``: it leaves out the 16-bit parameter partition).
  Optimizer offload moves gradients partitions and optimizer states to the host; parameter
  offload (ZeRO-3 only) moves the parameter partition too.
* **Reference model**: a frozen engine of the same weights in dtype ``d``: a full copy under
  ZeRO 0-2 (the reference engine is ZeRO-0), ``dP/N`` under ZeRO-3; 0 with LoRA (adapter
  disabled), when the reference log-probs are precomputed, and for reference-free losses (SimPO).
* **Activations** (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", section 4, redone for a Llama layer: RMSNorm, rotary, GQA, SwiGLU),
  bytes saved for backward per token per layer::

      2 norms x (residual d h + normalised d h + norm output d h + fp32 upcast 4h when d < 4)
      + q d h + k, v 2 d h_kv + o_proj input d h (+ d h attention output kept by sdpa/flash)
      + SwiGLU 4 d I                      (gate out, SiLU out, up out, product)
      + eager only: softmax probabilities a s (4 + d) (fp32 softmax + its cast; HF eager)

  Gradient checkpointing keeps only each layer's input ``d h`` per token, plus one layer's full
  set while it is recomputed. Tokens per micro-batch = ``2 x micro_batch x max_length`` (chosen and
  rejected are one concatenated forward).
* **Logits**: ``[2 micro, T, V]`` in ``d`` saved by ``losses._LabelLogProb`` plus the same size for
  their gradient (or the reference's logits, whichever is live), plus the float32 row temporaries
  of its row-at-a-time upcast (``3 x 4 T V`` when ``d < 4``, ``2 x 4 T V`` in fp32).
* **Communication buckets**: DeepSpeed's defaults as ``train/ds_config.py`` leaves them:
  ``reduce_bucket_size`` = 5e8 elements (ZeRO 1-3, contiguous gradients) or the ZeRO-0 all-reduce
  bucket (5e8), plus ZeRO-3's ``stage3_prefetch_bucket_size`` = 5e7 elements, each capped at the
  trainable (resp. all) parameters because a bucket never holds more.
* **Fragmentation**: 10 % of the allocated total (PyTorch's caching allocator on GPUs, glibc's
  malloc on CPUs); **CUDA context** 0.5 GiB per GPU (driver, cuBLAS workspace; outside
  ``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from catdpo_ray.plan.shapes import ModelShape

GIB = 1024**3
#: DeepSpeed defaults (deepspeed/runtime/zero/config.py); ds_config.py does not override them.
REDUCE_BUCKET_ELEMS = 500_000_000
PREFETCH_BUCKET_ELEMS = 50_000_000
#: stage3_max_live_parameters and stage3_max_reuse_distance (both 1e9 elements, DeepSpeed defaults).
MAX_LIVE_PARAMS = 1_000_000_000
FRAGMENTATION = 0.10
CUDA_CONTEXT_BYTES = GIB // 2
#: Host memory a GPU worker process holds besides model data (Python, torch + CUDA libs, Ray, DeepSpeed).
GPU_WORKER_HOST_BASELINE = 3 * GIB
#: Host memory a CPU worker holds besides model data (Python, torch, Ray, DeepSpeed, transformers,
#: Ray Data iterator): benchmarks/plan_vs_measured.py measured a 0.62 GiB peak RSS for a worker
#: training a 70k-parameter model; rounded up for libraries that other setups load.
CPU_WORKER_BASELINE = 1 * GIB


@dataclass(frozen=True)
class PlanSettings:
    """Everything of a run that moves memory, already resolved from the run config."""

    num_workers: int
    gpus_per_node: int = 8
    use_gpu: bool = True
    zero_stage: int = 2
    precision: str = "bf16"
    offload_optimizer: bool = False
    offload_param: bool = False
    lora: bool = False
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    micro_batch_size: int = 1
    #: Only used to keep the global batch when a smaller micro-batch is suggested.
    grad_accum: int = 1
    seq_len: int = 512
    #: ``online`` (a frozen engine / LoRA base), ``precompute`` (log-probs are dataset columns) or
    #: ``none`` (reference-free loss).
    reference: str = "online"

    @property
    def dtype_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4

    @property
    def world(self) -> int:
        return max(1, self.num_workers)

    @property
    def num_nodes(self) -> int:
        """Nodes used (a CPU run counts as one node: the machine it runs on)."""
        return -(-self.world // self.gpus_per_node) if self.use_gpu else 1

    @property
    def workers_per_node(self) -> int:
        return min(self.world, self.gpus_per_node) if self.use_gpu else self.world


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per worker. ``device`` lines live on the GPU (on the host for CPU runs); ``host`` lines
    are what the worker keeps in host memory on top of that (offloaded states, baseline)."""

    settings: PlanSettings
    total_params: int
    trainable_params: int
    device: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    activation_per_layer: dict[str, int] = field(default_factory=dict)

    @property
    def model_states(self) -> int:
        """Parameters + gradients + optimizer states (+ ZeRO-3 gathered set) on the device: the
        quantity DeepSpeed's estimators report per GPU."""
        keys = ("parameters", "gradients", "optimizer states", "zero3 gathered params")
        return sum(self.device.get(k, 0) for k in keys)

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    @property
    def host_per_worker(self) -> int:
        return sum(self.host.values())

    @property
    def host_per_node(self) -> int:
        s = self.settings
        return self.host_per_worker * s.workers_per_node + (0 if s.use_gpu else self.device_total * s.workers_per_node)


def model_state_bytes(p: int, p_t: int, n: int, stage: int, d: int, *, offload_optimizer: bool,
                      offload_param: bool) -> tuple[dict[str, int], dict[str, int]]:
    """(device, host) bytes of parameters, gradients and optimizer states per rank (table above)."""
    shard = n if stage >= 1 else 1
    params = d * p // n if stage == 3 else d * p
    if d == 2:
        grads = 2 * p_t // (n if stage >= 2 else 1) + 4 * p_t // shard
        opt = 12 * p_t // shard
    else:
        grads = 4 * p_t if stage == 0 else (4 * p_t + 4 * p_t // n if stage == 1 else 8 * p_t // n)
        opt = 8 * p_t if stage == 0 else 12 * p_t // n
    device = {"parameters": params, "gradients": grads, "optimizer states": opt}
    host: dict[str, int] = {}
    if offload_optimizer and stage >= 1:
        # The fp32 gradient partition, the optimizer states and (ZeRO-2/3) the 16-bit gradient
        # partition move to the host; ZeRO-1 keeps its full 16-bit gradients on the device.
        moved = grads - (d * p_t if stage == 1 else 0)
        host.update({"offloaded gradients": moved, "offloaded optimizer states": opt})
        device["gradients"] = grads - moved
        device["optimizer states"] = 0
    if offload_param and stage == 3:
        host["offloaded parameters"] = params
        device["parameters"] = 0
    return device, host


def activation_bytes_per_layer(shape: ModelShape, s: PlanSettings) -> dict[str, int]:
    """Bytes one decoder layer saves for backward per micro-batch, by attention kernel (docstring)."""
    d, h, seq = s.dtype_bytes, shape.hidden, s.seq_len
    tokens = 2 * s.micro_batch_size * seq
    h_kv = shape.kv_heads * shape.head_dim
    h_q = shape.heads * shape.head_dim
    norm = 3 * d * h + (4 * h if d < 4 else 0)
    common = 2 * norm + d * h_q + 2 * d * h_kv + d * h_q + 4 * d * shape.intermediate
    out: dict[str, int] = {}
    for impl in ("eager", "sdpa", "flash_attention_2"):
        per_token = common + (shape.heads * seq * (4 + (d if d < 4 else 0)) if impl == "eager" else d * h_q)
        out[impl] = tokens * per_token
    out["checkpointed"] = tokens * d * h
    return out


def _attn_key(impl: str) -> str:
    return "eager" if impl == "eager" else ("flash_attention_2" if "flash" in impl else "sdpa")


def plan_memory(shape: ModelShape, s: PlanSettings) -> MemoryPlan:
    """Per-worker memory of a run with settings ``s`` on a model of ``shape``."""
    d, n, stage = s.dtype_bytes, s.world, s.zero_stage
    p = shape.total_params()
    p_t = shape.lora_params(s.lora_r, list(s.lora_targets)) if s.lora else p
    p_all = p + (p_t if s.lora else 0)
    device, host = model_state_bytes(p_all, p_t, n, stage, d, offload_optimizer=s.offload_optimizer,
                                     offload_param=s.offload_param)
    largest = shape.largest_module_params()
    if stage == 3:
        device["zero3 gathered params"] = 2 * d * largest
        device["zero3 retained params"] = max(0, d * min(p_all, MAX_LIVE_PARAMS) - 2 * d * largest)
    # Reference: frozen engine (ZeRO-0 copy, or ZeRO-3 shard with the policy's offload setting).
    online_ref = not s.lora and s.reference == "online"
    ref = 0 if not online_ref else (d * p // n if stage == 3 else d * p)
    if stage == 3 and s.offload_param:
        host["offloaded reference"] = ref
        ref = 0
    device["reference model"] = ref
    if stage == 3 and online_ref:
        device["reference retained params"] = d * min(p, MAX_LIVE_PARAMS)

    per_layer = activation_bytes_per_layer(shape, s)
    full_layer = per_layer[_attn_key(s.attn_implementation)]
    tokens = 2 * s.micro_batch_size * s.seq_len
    if s.gradient_checkpointing:
        layers = shape.layers * per_layer["checkpointed"] + full_layer
    else:
        layers = shape.layers * full_layer
    # Final RMSNorm + LM-head input, and the 4D attention mask HF builds once per forward
    # (float in the model dtype for eager, bool for sdpa; flash-attention takes none).
    head = tokens * (3 * d * shape.hidden + (4 * shape.hidden if d < 4 else 0))
    mask_bytes = {"eager": d, "sdpa": 1, "flash_attention_2": 0}[_attn_key(s.attn_implementation)]
    mask = 2 * s.micro_batch_size * s.seq_len * s.seq_len * mask_bytes
    device["activations"] = layers + head + mask
    logits = 2 * d * tokens * shape.vocab
    device["logits"] = logits + (3 if d < 4 else 2) * 4 * s.seq_len * shape.vocab

    bucket = min(REDUCE_BUCKET_ELEMS, p_t) * d
    if stage == 3:
        bucket += min(PREFETCH_BUCKET_ELEMS, p_all) * d
    device["communication buckets"] = bucket
    allocated = sum(device.values())
    device["fragmentation (10%)"] = int(FRAGMENTATION * allocated)
    if s.use_gpu:
        device["CUDA context"] = CUDA_CONTEXT_BYTES
        host["worker process baseline"] = GPU_WORKER_HOST_BASELINE
        if stage < 3:
            # from_pretrained materialises each ZeRO 0-2 copy on the host before it moves to the GPU
            # (ZeRO-3 partitions at load time through zero.Init).
            host["model load (transient)"] = d * p
    else:
        host["worker process baseline"] = CPU_WORKER_BASELINE
    return MemoryPlan(settings=s, total_params=p, trainable_params=p_t, device=device, host=host,
                      activation_per_layer=per_layer)


def with_changes(s: PlanSettings, **changes: object) -> PlanSettings:
    """``s`` with some fields replaced (what the suggestion search tries)."""
    return replace(s, **changes)  # type: ignore[arg-type]
