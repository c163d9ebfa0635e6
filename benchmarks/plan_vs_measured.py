"""The memory plan against the measured peak memory of real CPU training workers.

Run (2 CPU cores, ~1 min per row)::

    python benchmarks/plan_vs_measured.py --sizes 10M 50M --workers 1 2 --stages 0 2 3
    python benchmarks/plan_vs_measured.py --sizes 150M --workers 1 --stages 0 2 3

For every (model size, workers, ZeRO stage) it builds a random-initialised Llama (``save_pretrained``
to a temp dir with the tiny model's tokenizer; no hub), trains ``--steps`` steps with
``catdpo_ray.train.driver.run_training`` (fp32, CPU, ``model.reference=online`` so the frozen
reference engine is loaded too) and measures each Ray Train worker from outside.

How it measures: a thread samples every 0.1 s the descendants of this process (the workers of the
Ray cluster it started; other jobs on the machine are not counted) whose title contains ``RayTrainWorker`` and reads ``VmHWM`` (the kernel's peak resident set) from ``/proc/<pid>/status``;
the per-worker peak is the largest value seen. Peak RSS includes the fixed cost of a worker
(Python, torch, Ray, DeepSpeed, transformers, gloo, shared libraries), so every configuration is
also run with a *baseline* model of the same vocabulary and about 70k parameters, and the table
compares differences: ``measured = peak(model) - peak(baseline)``, ``plan = plan(model) -
plan(baseline)`` (both the same workers, stage and batch). The raw peaks are printed as well.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil

#: name -> (hidden, layers, intermediate, heads); vocabulary = the tiny tokenizer's (2048).
SIZES: dict[str, tuple[int, int, int, int]] = {
    "base": (16, 1, 32, 2),
    "10M": (320, 8, 864, 5),
    "50M": (512, 14, 1376, 8),
    "100M": (640, 18, 1728, 10),
    "150M": (768, 20, 2048, 12),
}


class PeakSampler:
    """Largest VmHWM (bytes) of each RayTrainWorker process seen while running."""

    def __init__(self, period_s: float = 0.1) -> None:
        self.period_s = period_s
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:  # this process's own Ray cluster only: its raylet's workers are our descendants
                procs = psutil.Process().children(recursive=True)
            except psutil.Error:
                procs = []
            for proc in procs:
                try:
                    if "RayTrainWorker" not in " ".join(proc.cmdline()):
                        continue
                    status = Path(f"/proc/{proc.pid}/status").read_text()
                except (OSError, psutil.Error):
                    continue
                for line in status.splitlines():
                    if line.startswith("VmHWM:"):
                        kb = int(line.split()[1])
                        self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), kb * 1024)
            self._stop.wait(self.period_s)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def build_model(size: str, root: Path, tokenizer_dir: str) -> str:
    """A random-initialised Llama of ``SIZES[size]`` saved with the tiny tokenizer; returns its directory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if size == "tiny":  # the bundled tiny model itself (trained SFT weights)
        return tokenizer_dir
    hidden, layers, inter, heads = SIZES[size]
    out = root / f"llama-{size}"
    if (out / "config.json").exists():
        return str(out)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def overrides(model_dir: str, workers: int, stage: int, steps: int, out_dir: str, micro: int, max_len: int,
              reference: str = "online") -> list[str]:
    # online: the worker loads a frozen reference engine (its memory is measured); precompute: the
    # reference stage scores the pairs in a Ray Data actor before the workers start, and they load none.
    return [f"model.name_or_path={model_dir}", f"model.reference={reference}", f"scaling.num_workers={workers}",
            f"train.zero_stage={stage}", "train.precision=fp32", f"train.max_steps={steps}",
            f"train.micro_batch_size={micro}", "train.grad_accum=1", f"data.max_length={max_len}",
            f"data.max_prompt_length={max_len // 2}", f"data.max_train_rows={micro * workers * (steps + 1) * 2}",
            f"data.max_test_rows={max(8, 2 * workers)}", "output.save_final=false", "train.eval_before_after=false",
            "logging.tensorboard=false", "logging.progress=false", f"output.dir={out_dir}"]


def run_one(model_dir: str, ov: list[str]) -> tuple[list[int], float]:
    """Train once; (per-worker peak bytes, wall seconds)."""
    from catdpo_ray.config import load_config
    from catdpo_ray.train.driver import run_training

    cfg = load_config(None, ov)
    t0 = time.perf_counter()
    with PeakSampler() as sampler:
        result = run_training(cfg)
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.summary.get('error')}")
    return sorted(sampler.peaks.values(), reverse=True), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["10M", "50M"], choices=["tiny", *[s for s in SIZES if s != "base"]])
    ap.add_argument("--references", nargs="+", default=["online"], choices=["online", "precompute"],
                    help="online: workers hold a frozen reference engine; precompute: they load none")
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--stages", nargs="+", type=int, default=[0, 2, 3])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--workdir", default=None, help="keep models and runs here (default: a temp dir)")
    args = ap.parse_args()

    from catdpo_ray.config import load_config
    from catdpo_ray.plan import plan_memory
    from catdpo_ray.plan.planner import settings_from_config
    from catdpo_ray.plan.shapes import load_shape
    from catdpo_ray.tiny import ensure_tiny_model

    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="plan-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    tiny = str(ensure_tiny_model(None))
    base_dir = build_model("base", root, tiny)
    rows = []
    for reference in args.references:
        for workers in args.workers:
            for stage in args.stages:
                base_ov = overrides(base_dir, workers, stage, args.steps, str(root / "runs"), args.micro,
                                    args.max_length, reference)
                base_peaks, _ = run_one(base_dir, base_ov)
                base_plan = plan_memory(load_shape(base_dir), settings_from_config(load_config(None, base_ov)))
                for size in args.sizes:
                    model_dir = build_model(size, root, tiny)
                    ov = overrides(model_dir, workers, stage, args.steps, str(root / "runs"), args.micro,
                                   args.max_length, reference)
                    peaks, wall = run_one(model_dir, ov)
                    plan = plan_memory(load_shape(model_dir), settings_from_config(load_config(None, ov)))
                    planned = plan.device_total - base_plan.device_total
                    measured = max(peaks) - max(base_peaks)
                    row = (size, plan.total_params, reference, workers, stage, planned, measured, max(peaks),
                           max(base_peaks), wall)
                    rows.append(row)
                    print(f"[bench] {size} ref={reference} W={workers} ZeRO-{stage}: plan {planned / 2**20:.0f} MiB, "
                          f"measured {measured / 2**20:.0f} MiB (peaks {[p // 2**20 for p in peaks]} MiB, baseline "
                          f"{[p // 2**20 for p in base_peaks]} MiB), {wall:.0f}s", flush=True)
    print("\n| model | params | reference | workers | ZeRO | plan (MiB) | measured (MiB) | plan / measured | "
          "raw peak (MiB) | baseline peak (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size, p, ref, w, z, planned, measured, raw, base, _ in rows:
        print(f"| {size} | {p / 1e6:.1f}M | {ref} | {w} | {z} | {planned / 2**20:.0f} | {measured / 2**20:.0f} | "
              f"{planned / measured:.2f} | {raw / 2**20:.0f} | {base / 2**20:.0f} |")
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
