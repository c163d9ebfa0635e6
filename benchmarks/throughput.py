"""Throughput: a bare PyTorch DPO loop, TRL's ``DPOTrainer`` and ``catdpo-ray train``, side by side.

    python benchmarks/throughput.py                                  # every row, 3 repeats, 60 steps
    python benchmarks/throughput.py --repeats 1 --only bare trl      # rows whose label starts so
    python benchmarks/throughput.py --list                           # the rows and what they run

Same work for every row: the tiny model's weights (``catdpo_ray.tiny``), the bundled corpus' training
split as safety-aware pairs (``load_split``), tokenized by ``PairTokenizer`` (the trainer's own
tokenization), shuffled once with ``Random(seed)`` like the driver does, micro-batches of
``--micro-batch`` pairs per process, ``--steps`` optimizer steps, fp32, AdamW (lr 5e-4, betas 0.9/0.95,
no weight decay, gradient clipping 1.0), beta 0.1, no evaluation, no checkpoint export, no logging
that can be switched off. TRL (``pip install -e .[bench]``) gets the same token ids through a
subclass that skips its own tokenization; its ``gradient_checkpointing`` default is switched off.

Every configuration runs in its own subprocess (fresh memory accounting, no warm caches in the
process); the order rotates between repeats (repeat r starts at row r), so slow drift of the load on
the machine spreads over all rows. Per run it records:

- steady-state pairs/s and tokens/s: the median over the optimizer steps after ``--warmup`` steps.
  Bare loop: its own per-step timer. TRL: the interval between consecutive ``training_step`` calls.
  catdpo-ray: ``pairs_per_s`` / ``tokens_per_s`` of the ``metrics.jsonl`` step rows (rank 0's step
  time, global pairs). Tokens are the non-padding tokens of the chosen and rejected sequences;
- end-to-end wall: from starting the subprocess to its exit (imports, Ray, tokenization, the
  reference stage, model loading, the steps, teardown);
- peak memory: the process tree (the subprocess and every descendant: Ray's raylet, GCS and workers)
  sampled every 0.2 s with psutil; ``tree`` = the largest sum of RSS seen (shared pages counted once
  per process, so an upper bound), ``proc`` = the largest single process' RSS seen (a training
  worker's peak for catdpo-ray);
- ``os.getloadavg()`` at the start and the end of the run.

The report gives the median over repeats, the min-max spread, and the load; then the dual-update path
in milliseconds, measured from outside the trainer (:func:`dual_controller`, :func:`dual_collectives`).
Output: ``<out>/throughput.json`` (every run) and ``<out>/throughput.md`` (the tables).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LR, BETA, SEED, MAX_LENGTH = 5e-4, 0.1, 0, 128


@dataclass(frozen=True)
class Row:
    """One configuration. ``kind``: ``bare`` | ``trl`` | ``trainer``; ``opts`` its settings."""

    label: str
    kind: str
    opts: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def default_rows() -> list[Row]:
    """The rows measured by default (the informative subset of the trainer's cross product)."""
    rows = [Row(f"bare-{t}t-{ref}", "bare", {"threads": t, "reference": ref}) for t in (1, 2) for ref in ("online", "precompute")]
    rows += [Row("trl", "trl", {"precompute": False}), Row("trl-precompute", "trl", {"precompute": True})]
    trainer = [  # (workers, zero, reference, packing, cpus_per_worker)
        (0, 2, "online", "off", 1), (0, 2, "precompute", "auto", 1),
        (1, 0, "online", "off", 1), (1, 0, "precompute", "auto", 1),
        (2, 2, "online", "off", 1), (2, 2, "precompute", "off", 1), (2, 2, "precompute", "auto", 1),
        (2, 0, "precompute", "auto", 1),
    ]
    for w, z, ref, pack, cpw in trainer:
        name = "local" if w == 0 else f"{w}w"
        rows.append(Row(f"catdpo-{name}-z{z}-{ref}-pack{pack}", "trainer",
                        {"workers": w, "zero": z, "reference": ref, "packing": pack, "cpus_per_worker": cpw}))
    return rows


SKIPPED = ("catdpo 1 worker ZeRO-2 (ZeRO-2 on one rank partitions nothing: the ZeRO-0 row stands for it); "
           "2 workers ZeRO-0 online; online + packing (packing's effect is shown with precompute); "
           "local mode ZeRO-0 (one rank: no partitioning).")


# ----------------------------------------------------------------------------------------------- data


def tokenized_pairs(*, seed: int = SEED, max_rows: int | None = None) -> tuple[dict[str, Any], str, int, float]:
    """The bundled training split as safety-aware pairs, shuffled like the driver, tokenized by the trainer's
    :class:`~catdpo_ray.data.tokenize.PairTokenizer` in-process. Returns ``(columns, model_path, pad_id, seconds)``."""
    import numpy as np
    from transformers import AutoTokenizer

    from catdpo_ray.config import load_config
    from catdpo_ray.data.loader import load_split
    from catdpo_ray.data.tokenize import PairTokenizer
    from catdpo_ray.tiny import ensure_tiny_model

    t0 = time.perf_counter()
    cfg = load_config(None, [])
    model_path = str(ensure_tiny_model(cfg.model.cache_dir))
    pairs, _ = load_split(cfg.data, "train", pair_mode="safety_aware", require_categories=True)
    pairs = pairs[:max_rows] if max_rows else pairs
    random.Random(seed).shuffle(pairs)
    batch = {key: np.asarray([p[key] for p in pairs], dtype=object) for key in
             ("prompt", "chosen", "rejected", "safety_gap", "categories", "chosen_safe", "rejected_safe")}
    tokenizer = PairTokenizer(model_path, prompt_template=cfg.data.prompt_template, use_chat_template=False,
                              max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length)
    columns = tokenizer(batch)
    for key in ("chosen_ids", "rejected_ids", "categories"):
        columns[key] = np.asarray(columns[key] + [None], dtype=object)[:-1]  # 1-D object arrays, ragged rows
    tok = AutoTokenizer.from_pretrained(model_path)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return columns, model_path, int(pad_id), time.perf_counter() - t0


def _micro(columns: dict[str, Any], i: int, m: int) -> dict[str, Any]:
    """Micro-batch ``i`` of ``m`` rows (wrapping round the split)."""
    n = len(columns["chosen_start"])
    idx = [(i * m + j) % n for j in range(m)]
    return {key: value[idx] for key, value in columns.items()}


# ------------------------------------------------------------------------------------------ bare loop


def bare_loop(columns: dict[str, Any], model_path: str, pad_id: int, *, steps: int, micro_batch: int, threads: int,
              reference: str) -> dict[str, Any]:
    """The floor: one process, the policy plus a frozen reference (``online``), or reference log-probs
    scored once by the untrained policy before the first step (``precompute``: no second model), AdamW.

    Returns per-step ``step_times`` (s), ``step_pairs``, ``step_tokens`` and ``phases`` (s).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from catdpo_ray.data.tokenize import collate_pairs
    from catdpo_ray.losses import dpo_loss, sequence_logps

    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32) if reference == "online" else None
    if ref is not None:
        ref.requires_grad_(False).eval()
    phases["model_load_s"] = time.perf_counter() - t0

    def logps(model: Any, b: dict[str, Any]) -> Any:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        return sequence_logps(logits, b["input_ids"], b["loss_mask"])[0]

    batches = [collate_pairs(_micro(columns, i, micro_batch), pad_id=pad_id) for i in range(steps)]
    cached: list[Any] = []
    if reference == "precompute":
        t0 = time.perf_counter()
        policy.eval()
        with torch.inference_mode():
            cached = [logps(policy, b) for b in batches]
        phases["reference_s"] = time.perf_counter() - t0
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    times, pairs, tokens = [], [], []
    t_loop = time.perf_counter()
    for i in range(steps):
        t0 = time.perf_counter()
        # Collate inside the timed step, as the trainer and TRL do; the precomputed variant reads its cache.
        b = collate_pairs(_micro(columns, i, micro_batch), pad_id=pad_id)
        pol = logps(policy, b)
        if ref is not None:
            with torch.no_grad():
                rl = logps(ref, b)
        else:
            rl = cached[i]
        m = micro_batch
        loss = dpo_loss(pol[:m], pol[m:], rl[:m], rl[m:], beta=BETA).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        pairs.append(m)
        tokens.append(int(b["attention_mask"].sum()))
    phases["steps_s"] = time.perf_counter() - t_loop
    return {"step_times": times, "step_pairs": pairs, "step_tokens": tokens, "phases": phases}


# ------------------------------------------------------------------------------------------------ TRL


def trl_run(columns: dict[str, Any], model_path: str, pad_id: int, *, steps: int, micro_batch: int, threads: int,
            precompute: bool) -> dict[str, Any]:
    """TRL's ``DPOTrainer`` (sigmoid loss) on the same token ids, CPU, fp32; ``precompute`` = its
    ``precompute_ref_log_probs`` (the policy scores the training split once before training)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(threads)
    marks: list[tuple[float, int]] = []

    class PreTokenizedDPOTrainer(DPOTrainer):  # type: ignore[misc]
        """Takes the trainer's token ids as they are and timestamps every optimizer step."""

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            return dataset  # already prompt_ids / chosen_ids / rejected_ids

        def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            marks.append((time.perf_counter(), int(inputs["attention_mask"].sum())))
            return super().training_step(model, inputs, *args, **kwargs)

    phases: dict[str, float] = {}
    starts = columns["chosen_start"]
    data = Dataset.from_dict({
        "prompt_ids": [list(map(int, c[:s])) for c, s in zip(columns["chosen_ids"], starts)],
        "chosen_ids": [list(map(int, c[s:])) for c, s in zip(columns["chosen_ids"], starts)],
        "rejected_ids": [list(map(int, r[s:])) for r, s in zip(columns["rejected_ids"], columns["rejected_start"])],
    })
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    phases["model_load_s"] = time.perf_counter() - t0
    out_dir = tempfile.mkdtemp(prefix="trl-bench-")
    args = DPOConfig(
        output_dir=out_dir, per_device_train_batch_size=micro_batch, gradient_accumulation_steps=1, max_steps=steps,
        learning_rate=LR, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, optim="adamw_torch", max_grad_norm=1.0,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10), beta=BETA, loss_type=["sigmoid"],
        max_length=MAX_LENGTH, precompute_ref_log_probs=precompute, precompute_ref_batch_size=16,
        gradient_checkpointing=False, use_cpu=True, bf16=False, report_to="none", logging_strategy="no",
        save_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        dataloader_drop_last=True, seed=SEED,
    )
    t0 = time.perf_counter()
    trainer = PreTokenizedDPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    phases["trainer_init_s"] = time.perf_counter() - t0  # with precompute: the reference pass over the split
    t0 = time.perf_counter()
    trainer.train()
    phases["train_s"] = time.perf_counter() - t0
    shutil.rmtree(out_dir, ignore_errors=True)
    times = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    return {"step_times": times, "step_pairs": [micro_batch] * len(times), "step_tokens": [m[1] for m in marks[:-1]],
            "phases": phases}


# ----------------------------------------------------------------------------- subprocess measurement


class TreeMemory:
    """Peak RSS of a process and all its descendants, sampled every ``interval`` s in a thread."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        import psutil

        self._root = psutil.Process(pid)
        self.tree_peak = 0
        self.proc_peak = 0
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self._root, *self._root.children(recursive=True)]
            except psutil.Error:
                break
            rss = []
            for p in procs:
                try:
                    rss.append(p.memory_info().rss)
                except psutil.Error:
                    continue
            if rss:
                self.tree_peak = max(self.tree_peak, sum(rss))
                self.proc_peak = max(self.proc_peak, max(rss))
            self._stop.wait(self._interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def trainer_command(row: Row, args: argparse.Namespace, run_name: str, runs_dir: Path, cache_dir: Path) -> list[str]:
    """The exact ``catdpo-ray train`` command line of a trainer row."""
    o = row.opts
    exe = shutil.which("catdpo-ray")
    base = [exe] if exe else [sys.executable, "-m", "catdpo_ray.cli"]
    return [*base, "train",
            f"scaling.num_workers={o['workers']}", f"scaling.cpus_per_worker={o['cpus_per_worker']}",
            # Quoted: YAML reads a bare ``off`` as False, which the config rejects for train.packing.
            f"train.zero_stage={o['zero']}", f"model.reference={o['reference']}", f'train.packing="{o["packing"]}"',
            f"train.max_steps={args.steps}", f"train.micro_batch_size={args.micro_batch}", f"train.seed={SEED}",
            "train.precision=fp32", "train.eval_before_after=false", "output.save_final=false",
            "logging.tensorboard=false", "logging.progress=false", f"model.reference_cache_dir={cache_dir}",
            f"output.dir={runs_dir}", f"output.name={run_name}"]


def _steady(values: list[float], warmup: int) -> list[float]:
    return values[warmup:] if len(values) > warmup else values


def run_one(row: Row, repeat: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Run ``row`` in a fresh subprocess; return its measurements."""
    result_path = out / "raw" / f"{row.label}-r{repeat}.json"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    run_dir = None
    if row.kind == "trainer":
        run_name = f"{row.label}-r{repeat}"
        run_dir = out / "runs" / run_name
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = trainer_command(row, args, run_name, out / "runs", out / "reference_cache")
    else:
        spec = {"kind": row.kind, **row.opts, "steps": args.steps, "micro_batch": args.micro_batch,
                "threads": row.opts.get("threads", args.trl_threads)}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec), "--result", str(result_path)]
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    log_path = out / "logs" / f"{row.label}-r{repeat}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        mem = TreeMemory(proc.pid)
        rc = proc.wait()
        mem.stop()
    wall = time.perf_counter() - t0
    rec: dict[str, Any] = {"label": row.label, "kind": row.kind, "repeat": repeat, "rc": rc, "wall_s": wall,
                           "tree_peak_mib": mem.tree_peak / 2**20, "proc_peak_mib": mem.proc_peak / 2**20,
                           "load_start": load_start, "load_end": os.getloadavg(), "command": shlex.join(cmd)}
    if rc != 0:
        rec["error"] = log_path.read_text()[-2000:]
        return rec
    if row.kind == "trainer":
        assert run_dir is not None
        steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        steps = [s for s in steps if "pairs_per_s" in s]
        pps = _steady([s["pairs_per_s"] for s in steps], args.warmup)
        tps = _steady([s["tokens_per_s"] for s in steps], args.warmup)
        report = json.loads((run_dir / "data_report.json").read_text()).get("reference", {})
        # One entry per pass of the reference stage (``pairs`` = train+test in one pass, or ``test`` alone).
        stages = [i for i in report.values() if isinstance(i, dict) and "seconds" in i]
        summary = json.loads((run_dir / "summary.json").read_text())
        rec.update(steps=len(steps), pairs_per_s=statistics.median(pps), tokens_per_s=statistics.median(tps),
                   padding_share=statistics.median(_steady([s.get("padding_share", 0.0) for s in steps], args.warmup)),
                   fit_wall_s=summary.get("wall_time_s"),
                   reference_s=sum(i["seconds"] for i in stages) if stages else None,
                   reference_hit=all(i["hit"] for i in stages) if stages else None)
    else:
        child = json.loads(result_path.read_text())
        times = _steady(child["step_times"], args.warmup)
        pairs = _steady(child["step_pairs"], args.warmup)
        toks = _steady(child["step_tokens"], args.warmup)
        rec.update(steps=len(child["step_times"]), pairs_per_s=statistics.median(p / t for p, t in zip(pairs, times)),
                   tokens_per_s=statistics.median(k / t for k, t in zip(toks, times)), phases=child["phases"])
    return rec


def child_main(spec: dict[str, Any], result: Path) -> None:
    """A bare or TRL row inside its own subprocess."""
    t0 = time.perf_counter()
    columns, model_path, pad_id, tok_s = tokenized_pairs()
    kw = {"steps": spec["steps"], "micro_batch": spec["micro_batch"], "threads": spec["threads"]}
    if spec["kind"] == "bare":
        out = bare_loop(columns, model_path, pad_id, reference=spec["reference"], **kw)
    else:
        out = trl_run(columns, model_path, pad_id, precompute=spec["precompute"], **kw)
    out["phases"] = {"setup_and_tokenize_s": tok_s, **out["phases"], "child_total_s": time.perf_counter() - t0}
    result.write_text(json.dumps(out))


# ------------------------------------------------------------------------------------ dual-update path


def dual_controller(n: int = 300, warmup: int = 20) -> dict[str, Any]:
    """Rank 0's round trip to a MarginController actor, as the worker makes it: a standalone Ray actor of
    the same class with the driver's options, called through :class:`ControllerLink` with a metrics row of
    the trainer's shape (19 categories). Milliseconds per ``link.step``."""
    import ray
    import torch

    from catdpo_ray.config import load_config
    from catdpo_ray.train.controller import ControllerLink, MarginController
    from catdpo_ray.train.stepstats import SCALARS, step_row

    cfg = load_config(None, [])
    k = cfg.num_categories
    t0 = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=2, logging_level="ERROR")
    ray_start = time.perf_counter() - t0
    actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(MarginController).remote(
        list(cfg.data.categories), eta=cfg.dual.eta, epsilon=cfg.dual.epsilon, lambda_init=cfg.dual.lambda_init,
        lambda_max=cfg.dual.lambda_max, update_every=cfg.dual.update_every)
    link = ControllerLink(actor)
    link.begin(None, 0, {})
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(1, n + warmup + 1):
        counts = torch.randint(0, 3, (k,), generator=gen).double()
        viol = counts * 0.1
        glob = torch.cat([counts, viol, torch.rand(len(SCALARS), generator=gen, dtype=torch.float64) + 1.0])
        t = time.perf_counter()
        row = step_row(glob, k, 0.1, step, 0, LR, 2, torch.zeros(2, k, dtype=torch.float64), list(cfg.data.categories))
        link.step(step, glob[:k].tolist(), glob[k : 2 * k].tolist(), row)
        times.append((time.perf_counter() - t) * 1e3)
        if step % 10 == 0:
            ray.get(actor.drain.remote())  # the driver drains about once a second; keep the backlog realistic
    ray.shutdown()
    steady = times[warmup:]
    return {"ray_init_s": ray_start, "median_ms": statistics.median(steady),
            "p90_ms": statistics.quantiles(steady, n=10)[-1], "calls": len(steady)}


def _collective_worker(rank: int, world: int, port: int, n: int, warmup: int, queue: Any) -> None:
    import torch
    import torch.distributed as dist

    from catdpo_ray.config import load_config
    from catdpo_ray.train import dist as D
    from catdpo_ray.train.stepstats import SCALARS

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    k = load_config(None, []).num_categories
    cpu = torch.device("cpu")
    ops = {
        "all_reduce_min_full_step": lambda: D.all_reduce(torch.tensor([1.0]), cpu, op="min"),
        "all_gather_lambda": lambda: D.all_gather(torch.zeros(k, dtype=torch.float64), cpu),
        "all_reduce_sum_n_v_stats": lambda: D.all_reduce(torch.zeros(2 * k + len(SCALARS), dtype=torch.float64), cpu),
        "broadcast_lambda_binding": lambda: D.broadcast(torch.zeros(2 * k, dtype=torch.float64), cpu),
    }
    res: dict[str, list[float]] = {name: [] for name in ops}
    for i in range(n + warmup):
        for name, op in ops.items():
            dist.barrier()  # time the collective itself, not the other rank arriving late
            t = time.perf_counter()
            op()
            if i >= warmup:
                res[name].append((time.perf_counter() - t) * 1e3)
    dist.destroy_process_group()
    if rank == 0:
        queue.put({name: statistics.median(v) for name, v in res.items()})


def dual_collectives(world: int, n: int = 300, warmup: int = 20) -> dict[str, float]:
    """Median ms of each per-step collective of the worker loop (``catdpo_ray.train.dist`` helpers, same
    tensor sizes) in a ``world``-process gloo group on this machine (1 = local mode's 1-rank group)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_collective_worker, args=(r, world, port, n, warmup, queue)) for r in range(world)]
    for p in procs:
        p.start()
    out = queue.get(timeout=600)
    for p in procs:
        p.join()
    return out


# --------------------------------------------------------------------------------------------- report


def _fmt_range(values: list[float], digits: int = 1) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def table(records: list[dict[str, Any]], rows: list[Row]) -> str:
    """Markdown: per row the median over repeats (min-max in brackets) and the load averages seen."""
    lines = ["| row | pairs/s | tokens/s | e2e wall s | peak RSS tree MiB | peak RSS proc MiB | ref stage s | "
             "padding | runs | load 1-min (start-end) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        recs = [r for r in records if r["label"] == row.label and r.get("rc") == 0]
        failed = [r for r in records if r["label"] == row.label and r.get("rc") != 0]
        if not recs:
            if failed:
                lines.append(f"| {row.label} | failed ({len(failed)}) | | | | | | | | |")
            continue
        ref = [r for r in recs if r.get("reference_s") is not None]
        ref_txt = ", ".join(f"{r['reference_s']:.1f}{'h' if r.get('reference_hit') else 'c'}" for r in ref) or "-"
        pad = [r["padding_share"] for r in recs if "padding_share" in r]
        loads = "; ".join(f"{r['load_start'][0]:.1f}-{r['load_end'][0]:.1f}" for r in recs)
        lines.append(
            f"| {row.label} | {_fmt_range([r['pairs_per_s'] for r in recs])} | {_fmt_range([r['tokens_per_s'] for r in recs], 0)} "
            f"| {_fmt_range([r['wall_s'] for r in recs])} | {_fmt_range([r['tree_peak_mib'] for r in recs], 0)} "
            f"| {_fmt_range([r['proc_peak_mib'] for r in recs], 0)} | {ref_txt} "
            f"| {f'{statistics.median(pad):.2f}' if pad else '-'} | {len(recs)}{f' (+{len(failed)} failed)' if failed else ''} "
            f"| {loads} |")
    return "\n".join(lines)


def dual_table(dual: dict[str, Any]) -> str:
    lines = ["| part | local mode (1-rank gloo) ms | 2 workers (2-rank gloo) ms |", "|---|---:|---:|"]
    for name in dual["collectives_2"]:
        lines.append(f"| {name} | {dual['collectives_1'][name]:.3f} | {dual['collectives_2'][name]:.3f} |")
    c = dual["controller"]
    lines.append(f"| controller round trip (ControllerLink.step, median; p90 {c['p90_ms']:.2f}) | {c['median_ms']:.3f} | "
                 f"{c['median_ms']:.3f} |")
    from catdpo_ray.config import DualConfig

    every = DualConfig().check_every
    for world in (1, 2):
        coll = dual[f"collectives_{world}"]
        total = sum(coll.values()) + c["median_ms"]
        dual[f"total_{world}_ms"] = total
        dual[f"total_{world}_default_ms"] = total - coll["all_gather_lambda"] * (1 - 1 / every)
    lines.append(f"| **sum per step**, `dual.check_every=1` (the lambda all-gather every step) | "
                 f"{dual['total_1_ms']:.3f} | {dual['total_2_ms']:.3f} |")
    lines.append(f"| **sum per step**, default `dual.check_every={every}` (the all-gather every {every}th step) | "
                 f"{dual['total_1_default_ms']:.3f} | {dual['total_2_default_ms']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/catdpo-throughput"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the steady state")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--trl-threads", type=int, default=2)
    p.add_argument("--only", nargs="*", default=None, help="run only rows whose label starts with one of these")
    p.add_argument("--no-dual", action="store_true", help="skip the dual-update path measurement")
    p.add_argument("--list", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child), args.result)
        return 0
    rows = [r for r in default_rows() if not args.only or any(r.label.startswith(o) for o in args.only)]
    if args.list:
        for r in rows:
            print(f"{r.label:45s} {r.kind:8s} {r.opts}")
        print(f"skipped: {SKIPPED}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    records: list[dict[str, Any]] = []
    started = time.time()
    for rep in range(args.repeats):
        order = rows[rep % len(rows):] + rows[: rep % len(rows)]  # rotate: every row starts a repeat once
        for row in order:
            rec = run_one(row, rep, args, args.out)
            records.append(rec)
            # Written after every run, so an interrupted benchmark keeps what it measured.
            (args.out / "throughput.partial.json").write_text(json.dumps(records, indent=2, default=str))
            print(f"[{time.time() - started:7.0f}s] {row.label} r{rep}: rc={rec['rc']} "
                  f"{rec.get('pairs_per_s', float('nan')):.1f} pairs/s, wall {rec['wall_s']:.1f}s, "
                  f"load {rec['load_start'][0]:.1f}->{rec['load_end'][0]:.1f}", flush=True)
    dual: dict[str, Any] = {}
    if not args.no_dual:
        load0 = os.getloadavg()
        dual = {"controller": dual_controller(), "collectives_1": dual_collectives(1), "collectives_2": dual_collectives(2)}
        dual["load_start"], dual["load_end"] = load0, os.getloadavg()
    md = [f"Command: `{command}`", f"Machine: {os.cpu_count()} CPUs, {sys.platform}; python {sys.version.split()[0]}; "
          f"{args.steps} steps x {args.micro_batch} pairs per process, warm-up {args.warmup} steps left out; "
          f"{args.repeats} repeat(s), rotating order. Median (min-max) over repeats.",
          "", table(records, rows), "",
          "ref stage: seconds of the Ray Data reference stage per run, h = cache hit, c = computed.",
          f"Skipped rows: {SKIPPED}"]
    if dual:
        md += ["", f"Dual-update path (load {dual['load_start'][0]:.1f}-{dual['load_end'][0]:.1f}):", "", dual_table(dual)]
    text = "\n".join(md)
    (args.out / "throughput.md").write_text(text + "\n")
    (args.out / "throughput.json").write_text(json.dumps({"command": command, "rows": [asdict(r) for r in rows],
                                                          "records": records, "dual": dual}, indent=2, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
