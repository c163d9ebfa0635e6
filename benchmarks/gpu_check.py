"""The GPU check's steps (run through ``benchmarks/gpu_check.sh``; ``--cpu`` dry-runs them on CPU).

Every step runs the project's own entry points in a subprocess (``python -m catdpo_ray.cli``), with
a time limit, and adds one row to the table; a failing step is recorded with its error and the
next one still runs, so one lease gives the whole picture. Model FLOPs utilisation (MFU) counts
useful FLOPs only: ``6 N`` per real (non-padding) token for a policy forward+backward (Kaplan et
al. 2020; N = parameters without the input embedding table) plus attention ``12 L d T_ctx``
(PaLM appendix B, causal: half of it), divided by the chip's dense bf16 peak (H200/H100 SXM:
989 TFLOP/s; ``--peak-tflops`` to override).

Usage::

    python benchmarks/gpu_check.py [--cpu] [--out DIR] [--peak-tflops 989] [--only STEP ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: The ~1B Llama of the throughput rows (GPU), and the tiny stand-in of the CPU dry run.
ONE_B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
         "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048}
CPU_STANDIN = {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 4096, "max_position_embeddings": 512}


def _cli(*args: str, timeout: float, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """Run ``catdpo-ray ARGS`` in a subprocess; (exit code, output tail, seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "catdpo_ray.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    out = (proc.stdout + proc.stderr)[-4000:]
    return proc.returncode, out, time.perf_counter() - t0


def _steps(run_dir: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == "step"]


def _steady(rows: list[dict[str, Any]], key: str, skip: int = 3) -> float:
    """Median of ``key`` after the first ``skip`` steps (compilation, allocator warm-up)."""
    values = [r[key] for r in rows[skip:] if key in r] or [r[key] for r in rows if key in r]
    return statistics.median(values) if values else float("nan")


def model_flops_per_token(config: dict[str, Any], context: float) -> float:
    """Training FLOPs per token of one forward+backward: ``6 N + 6 L d T_ctx`` (causal attention).

    ``N`` excludes the input embedding table (a lookup, no FLOPs); the LM head is counted.
    ``context`` is the mean sequence length the tokens attend over.
    """
    d, f, n_layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = d // heads
    attn_params = d * d * 2 + 2 * d * kv * head_dim  # q, o  +  k, v
    mlp_params = 3 * d * f
    n_params = n_layers * (attn_params + mlp_params) + d * config["vocab_size"]
    return 6.0 * n_params + 6.0 * n_layers * d * context


def _train_args(run_root: Path, name: str, *, gpu: bool, zero: int, precision: str, extra: list[str]) -> list[str]:
    return ["train", f"output.dir={run_root}", f"output.name={name}", "scaling.num_workers=1",
            f"scaling.use_gpu={'true' if gpu else 'false'}", f"train.zero_stage={zero}", f"train.precision={precision}",
            "logging.tensorboard=false", *extra]


def step_train_tiny(ctx: dict[str, Any], zero: int) -> dict[str, Any]:
    gpu = not ctx["cpu"]
    name = f"tiny_z{zero}"
    code, out, secs = _cli(*_train_args(ctx["runs"], name, gpu=gpu, zero=zero, precision="bf16",
                                        extra=["train.max_steps=" + ("40" if gpu else "6"), "model.reference=precompute"]),
                           timeout=240)
    row: dict[str, Any] = {"step": f"train tiny ZeRO-{zero} bf16 ({'nccl' if gpu else 'gloo'})", "ok": code == 0,
                           "seconds": round(secs, 1)}
    if code != 0:
        row["error"] = out[-800:]
        return row
    run = ctx["runs"] / name
    rows = _steps(run)
    row.update({"pairs_per_s": round(_steady(rows, "pairs_per_s"), 1), "tokens_per_s": round(_steady(rows, "tokens_per_s")),
                "loss_first_last": [round(rows[0]["loss"], 4), round(rows[-1]["loss"], 4)]})
    if gpu:
        row["max_allocated_gib"] = round(max(r.get("cuda_max_allocated_gib", 0.0) for r in rows), 3)
    report = json.loads((run / "data_report.json").read_text())
    row["reference_stage"] = report.get("reference", {})
    return row


def step_eval(ctx: dict[str, Any]) -> dict[str, Any]:
    run = ctx["runs"] / "tiny_z2"
    if not (run / "final" / "config.json").exists():
        return {"step": "catdpo-ray eval", "ok": False, "error": "no tiny_z2/final to evaluate (the ZeRO-2 row failed)"}
    code, out, secs = _cli("eval", "--model", str(run / "final"), "--config", str(run / "config.yaml"),
                           "eval.max_prompts_per_category=" + ("20" if not ctx["cpu"] else "3"), timeout=240)
    row: dict[str, Any] = {"step": "catdpo-ray eval (rule judge)", "ok": code == 0, "seconds": round(secs, 1)}
    if code != 0:
        row["error"] = out[-800:]
        return row
    report = json.loads((run / "final" / "eval" / "report.json").read_text())
    row.update({"macro": report.get("macro"), "worst3": report.get("worst3"),
                "generation": {k: v for k, v in report.get("generation", {}).items() if k in ("backend", "prompts", "seconds")}})
    return row


def _write_model(ctx: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """A random-initialised Llama (``ONE_B`` on GPU, ``CPU_STANDIN`` on CPU) with the tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from catdpo_ray.tiny import ensure_tiny_model

    shape = CPU_STANDIN if ctx["cpu"] else ONE_B
    out = ctx["work"] / ("llama_standin" if ctx["cpu"] else "llama_1b")
    if not (out / "config.json").exists():
        torch.manual_seed(0)
        config = LlamaConfig(**shape, tie_word_embeddings=False)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(ensure_tiny_model(None)).save_pretrained(out)
    return out, shape


def _long_corpus(ctx: dict[str, Any]) -> tuple[Path, Path]:
    """A corpus with a realistic length spread (the synth generator's opt-in option), written once."""
    out = ctx["work"] / "corpus_long"
    if not (out / "train.jsonl").exists():
        subprocess.run([sys.executable, "-m", "catdpo_ray.data.synth", "--out", str(out), "--train", "1200", "--test", "200",
                        "--length-spread", "realistic"], cwd=ROOT, check=True, capture_output=True)
    return out / "train.jsonl", out / "test.jsonl"


def step_throughput(ctx: dict[str, Any]) -> dict[str, Any]:
    """The ~1B model through the trainer: steady tokens/s, MFU, and the plan vs measured peak."""
    gpu = not ctx["cpu"]
    model, shape = _write_model(ctx)
    train, test = _long_corpus(ctx)
    extra = [f"model.name_or_path={model}", f"data.train={train}", f"data.test={test}", "data.max_length=1024",
             "data.max_prompt_length=256", "train.micro_batch_size=" + ("8" if gpu else "2"),
             "train.max_steps=" + ("30" if gpu else "4"), "model.attn_implementation=sdpa", "train.eval_before_after=false",
             "eval.generate=false"]
    args = _train_args(ctx["runs"], "one_b", gpu=gpu, zero=2, precision="bf16", extra=extra)
    code, out, secs = _cli(*args, timeout=360)
    row: dict[str, Any] = {"step": f"{'~1B' if gpu else 'stand-in'} Llama through the trainer (bf16, sdpa, ZeRO-2)",
                           "ok": code == 0, "seconds": round(secs, 1)}
    if code != 0:
        row["error"] = out[-800:]
        return row
    rows = _steps(ctx["runs"] / "one_b")
    tokens_per_s = _steady(rows, "tokens_per_s")
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in rows) / max(1, len(rows))
    context = tokens / max(1.0, 2.0 * _steady(rows, "pairs"))  # mean real tokens per sequence
    flops = model_flops_per_token(shape, context) * tokens_per_s
    row.update({"tokens_per_s": round(tokens_per_s), "padding_share": round(_steady(rows, "padding_share"), 3),
                "mean_seq_tokens": round(context, 1), "model_tflops": round(flops / 1e12, 2)})
    if gpu:
        row["mfu"] = round(flops / (ctx["peak_tflops"] * 1e12), 3)
        measured = max(r.get("cuda_max_allocated_gib", 0.0) for r in rows)
        row["max_allocated_gib"] = round(measured, 2)
    pcode, pout, _ = _cli("plan", "--config", str(ctx["runs"] / "one_b" / "config.yaml"), "--gpu-memory",
                          "139GiB" if gpu else "8GiB", "--gpus-per-node", "1", "--json", timeout=120)
    row["plan_exit"] = pcode
    try:
        plan = json.loads(pout[pout.index("{"):])
        row["plan_per_gpu_gib"] = round(plan["per_gpu_total_bytes"] / 2**30, 2)
        if gpu and row.get("max_allocated_gib"):
            row["plan_over_measured"] = round(row["plan_per_gpu_gib"] / row["max_allocated_gib"], 3)
    except (ValueError, KeyError) as exc:
        row["plan_error"] = f"{type(exc).__name__}: {pout[-400:]}"
    return row


def step_ceiling(ctx: dict[str, Any]) -> dict[str, Any]:
    """Bare forward+backward of the same model at a long sequence: the kernel ceiling (no trainer)."""
    import torch
    from transformers import AutoModelForCausalLM

    gpu = not ctx["cpu"]
    model_dir, shape = _write_model(ctx)
    rows = []
    impls = ["sdpa"]
    try:
        import flash_attn  # noqa: F401

        impls.append("flash_attention_2")
    except ImportError:
        pass
    for impl in impls:
        device = torch.device("cuda" if gpu else "cpu")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation=impl).to(device)
        model.gradient_checkpointing_disable()
        batch, seq = (4, 2048) if gpu else (1, 128)
        ids = torch.randint(0, 2000, (batch, seq), device=device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        times = []
        for i in range(8 if gpu else 3):
            if gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if gpu:
                torch.cuda.synchronize()
            if i >= 2 or not gpu:
                times.append(time.perf_counter() - t0)
        tps = batch * seq / statistics.median(times)
        flops = model_flops_per_token(shape, seq / 2) * tps
        row = {"step": f"bare fwd+bwd+AdamW, {impl}, {batch}x{seq}", "ok": True, "tokens_per_s": round(tps),
               "model_tflops": round(flops / 1e12, 2)}
        if gpu:
            row["mfu"] = round(flops / (ctx["peak_tflops"] * 1e12), 3)
            row["max_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        rows.append(row)
        del model, opt
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return {"step": "kernel ceiling", "ok": True, "rows": rows}


STEPS = {
    "tiny_z2": lambda ctx: step_train_tiny(ctx, 2),
    "tiny_z3": lambda ctx: step_train_tiny(ctx, 3),
    "eval": step_eval,
    "throughput": step_throughput,
    "ceiling": step_ceiling,
}


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| step | ok | seconds | figures |", "|---|---|---|---|"]
    for r in rows:
        figures = {k: v for k, v in r.items() if k not in ("step", "ok", "seconds", "rows")}
        lines.append(f"| {r['step']} | {'yes' if r.get('ok') else 'NO'} | {r.get('seconds', '')} | "
                     f"{json.dumps(figures, default=str)[:600]} |")
        for sub in r.get("rows", []):
            figures = {k: v for k, v in sub.items() if k not in ("step", "ok")}
            lines.append(f"| {sub['step']} | yes | | {json.dumps(figures)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="dry run on CPU with tiny stand-ins")
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/catdpo-gpu-check")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the chip (H200/H100 SXM: 989)")
    ap.add_argument("--only", nargs="*", choices=sorted(STEPS), help="run only these steps")
    args = ap.parse_args(argv)
    out = Path(args.out)
    ctx: dict[str, Any] = {"cpu": args.cpu, "peak_tflops": args.peak_tflops, "runs": out / "runs", "work": out / "work"}
    ctx["work"].mkdir(parents=True, exist_ok=True)
    import torch

    header = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "mode": "cpu" if args.cpu else "gpu",
              "command": " ".join(["benchmarks/gpu_check.sh", *(argv if argv is not None else sys.argv[1:])])}
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; use --cpu for the dry run", file=sys.stderr)
        return 2
    print(f"[gpu_check] {header}", flush=True)
    rows = []
    t0 = time.perf_counter()
    for name in args.only or list(STEPS):
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            row = STEPS[name](ctx)
        except Exception as exc:  # noqa: BLE001 - one failing step must not hide the others' figures
            row = {"step": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(f"[gpu_check] {json.dumps(row, default=str)[:1200]}", flush=True)
        rows.append(row)
    header["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "gpu_check.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2, default=str))
    table = f"GPU check ({header['mode']}, {header['device']}, torch {header['torch']}), {header['wall_s']} s\n\n{_table(rows)}\n"
    (out / "gpu_check.md").write_text(table)
    print(table, flush=True)
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
