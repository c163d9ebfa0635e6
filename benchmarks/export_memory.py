"""Peak host memory of the final HF export: whole-model gather vs. the streaming sharded export.

    python benchmarks/export_memory.py                     # ~150M-parameter Llama, fp32, ZeRO-3, 1 rank
    python benchmarks/export_memory.py --layers 4 --hidden 256 --vocab 8000   # a quick look

A random-initialised Llama (``save_pretrained`` into ``--work``, loaded with ``from_pretrained``)
becomes a real 1-rank ZeRO-3 DeepSpeed engine (gloo, CPU, fp32, torch AdamW), and one export runs:

- ``old``: ``gather_state_dict`` + ``save_hf_model`` (the whole model on rank 0, one file);
- ``new``: ``catdpo_ray.train.export.export_hf_model`` (groups of layers, streamed shards).

Measurement: each export runs in a fresh subprocess, so nothing another export allocated (or the
allocator kept) is counted. After the engine is built the child resets the kernel's peak-RSS
counter (``echo 5 > /proc/self/clear_refs`` resets ``VmHWM``; loading itself peaks far above the
export), reads ``VmRSS``, runs the export and reads ``VmHWM``: the *extra peak* is
``VmHWM - VmRSS_before``. On CPU with one rank the ZeRO-3 partitions already hold the full model,
so only the additional memory the export needs is meaningful; it is compared with the largest
gather group (what ``GatheredParameters`` materialises) and the shard size.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MB = 10**6


def _status(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (Linux /proc)."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]


def build_model(work: Path, *, layers: int, hidden: int, intermediate: int, vocab: int) -> Path:
    """A seeded random Llama saved with ``save_pretrained`` (untied embeddings, like Llama-2)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = work / f"llama-L{layers}-H{hidden}-I{intermediate}-V{vocab}"
    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def child(mode: str, model_dir: Path, out_dir: Path, max_shard_size: str, layers_per_gather: int) -> dict[str, Any]:
    """One export in this (fresh) process; returns the memory figures."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from catdpo_ray.config import load_config
    from catdpo_ray.train.ds_config import build_ds_config
    from catdpo_ray.train.export import export_hf_model
    from catdpo_ray.train.modeling import gather_state_dict, load_causal_lm, save_hf_model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"})
    dist.init_process_group("gloo", rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config(None, ["train.zero_stage=3", "train.micro_batch_size=1", "train.grad_accum=1"])
    model = load_causal_lm(cfg, str(model_dir))
    params = [p for p in model.parameters()]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=torch.optim.AdamW(params, lr=1e-4),
                                      config=build_ds_config(cfg, world_size=1))
    del model, params
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now; loading peaked higher
    rss_before = _status("VmRSS")
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    if mode == "old":
        sd = gather_state_dict(engine.module, zero3=True, is_rank0=True)
        save_hf_model(sd, engine.module.config, out_dir, None)
        del sd
    else:
        result = export_hf_model(engine.module, out_dir, tokenizer=None, zero3=True, is_rank0=True,
                                 max_shard_size=max_shard_size, layers_per_gather=layers_per_gather)
        info = {"files": len(result.files), "max_group_bytes": result.max_group_bytes}
    wall = time.perf_counter() - t0
    peak = _status("VmHWM")
    model_bytes = sum(p.ds_numel * p.element_size() for p in engine.module.parameters())
    layer = engine.module.model.layers[0]
    layer_bytes = sum(p.ds_numel * p.element_size() for p in layer.parameters())
    return {"mode": mode, "rss_before": rss_before, "peak": peak, "extra_peak": peak - rss_before, "wall_s": wall,
            "model_bytes": model_bytes, "layer_bytes": layer_bytes, "max_shard_size": max_shard_size,
            "layers_per_gather": layers_per_gather, **info}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "catdpo-export-bench")
    ap.add_argument("--child", nargs=4, metavar=("MODE", "MODEL", "SHARD", "LPG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, model, shard, lpg = args.child
        out = Path(model).parent / f"out-{mode}-{shard}-{lpg}"
        print("RESULT " + json.dumps(child(mode, Path(model), out, shard, int(lpg))), flush=True)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    model = build_model(args.work, layers=args.layers, hidden=args.hidden, intermediate=args.intermediate,
                        vocab=args.vocab)
    cases = [("old", "5GB", 2), ("new", "100MB", 2), ("new", "5GB", 2), ("new", "100MB", 1), ("new", "100MB", 4)]
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    for mode, shard, lpg in cases:
        proc = subprocess.run([sys.executable, __file__, "--child", mode, str(model), shard, str(lpg)],
                              capture_output=True, text=True, env=env, check=False)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"child {mode} {shard} {lpg} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        rows.append(json.loads(line[len("RESULT "):]))
    first = rows[0]
    print(f"model: {args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, vocab {args.vocab}: "
          f"{first['model_bytes'] / 4 / 1e6:.1f}M parameters, {first['model_bytes'] / MB:.0f} MB fp32; "
          f"one layer {first['layer_bytes'] / MB:.1f} MB; RSS before export {first['rss_before'] / MB:.0f} MB")
    print("| export | max_shard_size | layers/gather | files | largest group (MB) | extra peak RSS (MB) | "
          "extra / model | wall (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        old = r["mode"] == "old"
        print(f"| {'gather_state_dict + save_hf_model' if old else 'export_hf_model'} | "
              f"{'(one file)' if old else r['max_shard_size']} | {'all' if old else r['layers_per_gather']} | "
              f"{1 if old else r['files']} | {r['model_bytes'] / MB if old else r['max_group_bytes'] / MB:.1f} | "
              f"{r['extra_peak'] / MB:.1f} | {r['extra_peak'] / r['model_bytes']:.2f} | {r['wall_s']:.1f} |")


if __name__ == "__main__":
    main()
