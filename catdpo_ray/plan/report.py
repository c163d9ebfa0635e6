"""Human-readable plan: per-GPU and per-node breakdown, verdict, and the fix as ``key=value``."""

from __future__ import annotations

from catdpo_ray.plan.memory import GIB, MemoryPlan
from catdpo_ray.plan.planner import PlanResult


def _gib(n: int) -> str:
    return f"{n / GIB:9.2f} GiB"


def format_breakdown(plan: MemoryPlan) -> list[str]:
    """Lines of one plan: the settings, the per-worker device lines, the host lines, per-node totals."""
    s = plan.settings
    where = "per GPU" if s.use_gpu else "per CPU worker (host memory)"
    lines = [
        f"params {plan.total_params / 1e9:.3f} B (trainable {plan.trainable_params / 1e9:.4f} B); "
        f"{s.world} worker(s){f' on {s.num_nodes} node(s) x {s.gpus_per_node} GPUs' if s.use_gpu else ' on CPU'}; "
        f"ZeRO-{s.zero_stage} {s.precision}"
        f"{' +offload_optimizer' if s.offload_optimizer else ''}{' +offload_param' if s.offload_param else ''}"
        f"{' +LoRA r=' + str(s.lora_r) if s.lora else ''}; micro-batch {s.micro_batch_size} pairs x 2 x {s.seq_len} "
        f"tokens; attention {s.attn_implementation}; checkpointing {'on' if s.gradient_checkpointing else 'off'}; "
        f"reference {s.reference}",
        f"  {where}:",
    ]
    lines += [f"    {k:<28}{_gib(v)}" for k, v in plan.device.items()]
    lines.append(f"    {'total':<28}{_gib(plan.device_total)}")
    per = plan.activation_per_layer
    lines.append("    activations per layer: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in per.items()))
    lines.append("  host memory per worker:")
    lines += [f"    {k:<28}{_gib(v)}" for k, v in plan.host.items()]
    lines.append(f"  host memory per node ({s.workers_per_node} worker(s)): {plan.host_per_node / GIB:.2f} GiB")
    lines.append(f"  model states per {'GPU' if s.use_gpu else 'worker'} (DeepSpeed estimator's quantity): "
                 f"{plan.model_states / GIB:.2f} GiB")
    return lines


def format_plan(result: PlanResult) -> str:
    """The whole report ``catdpo-ray plan`` prints and the driver's refusal quotes."""
    hw = result.hardware
    head = (f"memory plan for {result.model} on {hw.gpus_per_node} x {hw.gpu_memory / GIB:.0f} GiB GPUs per node"
            if result.plan.settings.use_gpu else f"memory plan for {result.model} on CPU")
    lines = [head, *format_breakdown(result.plan)]
    if result.fits:
        lines.append("verdict: FITS")
    else:
        lines.append("verdict: DOES NOT FIT: " + "; ".join(result.problems))
        if result.fix and result.fix_plan is not None:
            lines.append("smallest change that fits: " + " ".join(result.fix))
            lines.append(f"  with it: {result.fix_plan.device_total / GIB:.2f} GiB per "
                         f"{'GPU' if result.plan.settings.use_gpu else 'worker'}, "
                         f"{result.fix_plan.host_per_node / GIB:.2f} GiB host per node")
        else:
            lines.append("no single or combined change tried fits (see the breakdown)")
    return "\n".join(lines)
