"""The tiny default model: a few-million-parameter Llama built from the bundled corpus, cached.

``model.name_or_path: tiny`` resolves to :func:`ensure_tiny_model`, which returns a directory
that ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` load like any
hub model, so tests and the CPU demo run the same code path as a 7B run.

Building it happens once per cache and costs about 55 s of single-core CPU time (160 SFT
steps of 32 sequences; one torch thread, see ``build_tiny``):

1. train a byte-level BPE tokenizer on the bundled train corpus (prompt template included);
2. build a seeded ``LlamaForCausalLM`` (hidden 192, 4 layers, 4 heads, MLP 512, context 256,
   untied embeddings; about 2.5M parameters);
3. warm-start it with a short supervised pass over *both* responses of every training row, loss on
   response tokens + EOS only. Like an Alpaca-style SFT model it learns to answer unsafely as
   often as the data does, unevenly across categories -- the starting point the alignment methods
   are meant to fix;
4. save model (safetensors) + tokenizer + ``manifest.json`` (corpus hash, seed, sizes, SFT loss,
   per-category SFT preference accuracy on the bundled test split) into
   ``<cache>/tiny-llama-v1/``.

Concurrency: an ``fcntl`` lock serialises builders; the model is built in a temporary directory
and renamed into place, so no process ever sees a half-written model.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

MODEL_DIRNAME = "tiny-llama-v1"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
#: Env knob for a shorter supervised pass (tests); the default build ignores it when unset.
SFT_STEPS_ENV = "CATDPO_TINY_SFT_STEPS"


@dataclass(frozen=True)
class TinySpec:
    """Everything that determines the built model (all of it goes into the manifest's build key)."""

    seed: int = 0
    vocab_size: int = 2048
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 256
    sft_steps: int = 160
    sft_batch_size: int = 32
    sft_lr: float = 3e-3
    sft_warmup: int = 20
    max_length: int = 128
    prompt_template: str = "USER: {prompt} ASSISTANT:"


def default_cache_dir() -> Path:
    """``$CATDPO_CACHE`` or ``~/.cache/catdpo_ray``."""
    env = os.environ.get("CATDPO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "catdpo_ray"


def _log(msg: str) -> None:
    """A short progress line on stdout."""
    print(f"[tiny] {msg}", flush=True)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All rows of a JSONL file."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _corpus_sha256() -> str:
    """sha256 of the bundled train split (a changed corpus invalidates the cache)."""
    from catdpo_ray.data.synth import SAMPLE_DIR

    return hashlib.sha256((SAMPLE_DIR / "train.jsonl").read_bytes()).hexdigest()


def _build_key(spec: TinySpec) -> dict[str, Any]:
    """What a cached build must match to be reused."""
    return {"format": FORMAT_VERSION, "corpus_sha256": _corpus_sha256(), "spec": asdict(spec)}


def _is_current(model_dir: Path, key: Mapping[str, Any]) -> bool:
    """True if ``model_dir`` holds a complete build whose key equals ``key``."""
    try:
        manifest = json.loads((model_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("build_key") == key


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (blocks until free; released on exit or process death)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def ensure_tiny_model(
    cache_dir: str | Path | None = None,
    *,
    force: bool = False,
    sft_steps: int | None = None,
    seed: int = 0,
) -> Path:
    """Return the tiny model directory, building it first if it is missing or stale.

    Args:
        cache_dir: cache root (default :func:`default_cache_dir`); the model lives in
            ``<cache_dir>/tiny-llama-v1``.
        force: rebuild even if a current build exists. The new build is renamed into place;
            a process still reading the old files at that moment may fail (only with ``force``).
        sft_steps: override the supervised steps (default: ``$CATDPO_TINY_SFT_STEPS`` or
            :attr:`TinySpec.sft_steps`). Part of the build key: a different value rebuilds.
        seed: the build seed (weight initialisation and SFT batch order).

    Returns:
        Path of a directory loadable by ``AutoModelForCausalLM`` and ``AutoTokenizer``.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    steps = sft_steps if sft_steps is not None else int(os.environ.get(SFT_STEPS_ENV, TinySpec.sft_steps))
    spec = replace(TinySpec(), seed=seed, sft_steps=steps)
    key = _build_key(spec)
    final = root / MODEL_DIRNAME
    if not force and _is_current(final, key):
        return final
    with _file_lock(root / f"{MODEL_DIRNAME}.lock"):
        if not force and _is_current(final, key):  # another process built it while we waited
            return final
        for stale in root.glob(f".{MODEL_DIRNAME}.*-*"):  # left by a killed builder (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}.tmp-", dir=root))
        try:
            _build(tmp, spec, key)
            if final.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}.old-", dir=root))
                final.rename(old / "model")
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------
# the build


def _encode(tokenizer: Any, prompt: str, response: str, template: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt + response + EOS and the index of the first response token.

    Uses the training pipeline's own encoders, so SFT sees exactly what DPO will see.
    """
    from catdpo_ray.data.tokenize import encode_prompt, encode_response, format_prompt

    text = format_prompt(tokenizer, prompt, template=template, use_chat_template=False)
    p = encode_prompt(tokenizer, text, use_chat_template=False)
    r = encode_response(tokenizer, response)
    return (p + r)[:max_length], len(p)


def _batch(seqs: Sequence[tuple[list[int], int]], pad_id: int) -> tuple[Any, Any, Any]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 off the response)."""
    import torch

    width = max(len(ids) for ids, _ in seqs)
    ids_t = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (ids, start) in enumerate(seqs):
        ids_t[i, : len(ids)] = torch.tensor(ids)
        attn[i, : len(ids)] = 1
        labels[i, start : len(ids)] = torch.tensor(ids[start:])
    return ids_t, attn, labels


def response_logprobs(model: Any, batch: tuple[Any, Any, Any]) -> tuple[Any, Any]:
    """Per-sequence sum of response-token log-probs and response token counts, shape ``[B]`` each."""
    import torch

    ids, attn, labels = batch
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != -100
    logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logps * mask).sum(-1), mask.sum(-1)


def sft_preference_accuracy(
    model: Any, tokenizer: Any, rows: Sequence[Mapping[str, Any]], *, template: str, max_length: int = 128
) -> dict[str, float]:
    """Per category: % of safety-gap pairs (one safe, one unsafe response) where the model's mean
    per-token log-prob of the safe response exceeds the unsafe one's (METHOD.md section 6)."""
    import torch

    from catdpo_ray.config import PKU_CATEGORIES
    from catdpo_ray.data.synth import row_categories

    gap_rows = [r for r in rows if r["is_response_0_safe"] != r["is_response_1_safe"]]
    wins: dict[str, list[bool]] = {name: [] for name in PKU_CATEGORIES}
    model.eval()
    with torch.no_grad():
        for start in range(0, len(gap_rows), 64):
            chunk = gap_rows[start : start + 64]
            seqs = []
            for r in chunk:
                safe_id = 0 if r["is_response_0_safe"] else 1
                for rid in (safe_id, 1 - safe_id):
                    seqs.append(_encode(tokenizer, r["prompt"], r[f"response_{rid}"], template, max_length))
            total, count = response_logprobs(model, _batch(seqs, tokenizer.pad_token_id))
            mean = (total / count.clamp(min=1)).view(-1, 2)
            for r, (safe_lp, unsafe_lp) in zip(chunk, mean.tolist()):
                for name in row_categories(r):
                    wins[name].append(safe_lp > unsafe_lp)
    return {name: round(100.0 * sum(w) / len(w), 1) for name, w in wins.items() if w}


def _build(out: Path, spec: TinySpec, key: Mapping[str, Any]) -> None:
    """Build from the bundled corpus into ``out`` (a fresh temporary directory)."""
    from catdpo_ray.data.synth import SAMPLE_DIR

    build_tiny(out, spec, _read_jsonl(SAMPLE_DIR / "train.jsonl"), _read_jsonl(SAMPLE_DIR / "test.jsonl"), key=key)


def build_tiny(
    out: Path,
    spec: TinySpec,
    train_rows: Sequence[Mapping[str, Any]],
    test_rows: Sequence[Mapping[str, Any]] = (),
    *,
    key: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Tokenizer, model, SFT on ``train_rows``, save into ``out``; returns the manifest.

    ``test_rows`` (PKU schema) are only scored: the manifest records the per-category SFT
    preference accuracy on their safety-gap pairs.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from catdpo_ray.data.tokenizer_build import train_tokenizer

    t0, cpu0 = time.perf_counter(), time.process_time()
    prev_threads = torch.get_num_threads()
    # One thread: the matmuls are small, a fixed count keeps the weights bit-identical across
    # machines, and on a busy box (Ray workers, parallel tests) multi-threaded steps stall on
    # descheduled OpenMP threads -- measured 9 s/step with 2 threads vs 0.3 s with 1.
    torch.set_num_threads(1)
    try:
        template = spec.prompt_template
        texts = [template.format(prompt=r["prompt"]) + " " + r[f"response_{i}"] for r in train_rows for i in (0, 1)]
        tokenizer = train_tokenizer(texts, out, spec.vocab_size, model_max_length=spec.max_position_embeddings)
        _log(f"tokenizer: {len(tokenizer)} tokens ({time.perf_counter() - t0:.1f}s)")

        torch.manual_seed(spec.seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_heads,
            max_position_embeddings=spec.max_position_embeddings,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = LlamaForCausalLM(config)
        n_params = sum(p.numel() for p in model.parameters())
        _log(f"model: LlamaForCausalLM, {n_params / 1e6:.2f}M parameters")

        seqs = [
            _encode(tokenizer, r["prompt"], r[f"response_{i}"], template, spec.max_length)
            for r in train_rows
            for i in (0, 1)
        ]
        final_loss = _sft(model, seqs, spec, tokenizer.pad_token_id)
        accuracy = (
            sft_preference_accuracy(model, tokenizer, test_rows, template=template, max_length=spec.max_length)
            if test_rows
            else {}
        )
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out, safe_serialization=True)
        seconds = time.perf_counter() - t0
        manifest = {
            "build_key": dict(key or {}),
            "name": MODEL_DIRNAME,
            "parameters": n_params,
            "vocab_size": len(tokenizer),
            "train_rows": len(train_rows),
            "sft_sequences": len(seqs),
            "sft_final_loss": round(final_loss, 4),
            "sft_preference_accuracy": accuracy,
            "torch_threads": torch.get_num_threads(),
            "build_seconds": round(seconds, 1),
            "build_cpu_seconds": round(time.process_time() - cpu0, 1),
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # written last: marks completeness
        _log(f"saved in {seconds:.1f}s (SFT loss {final_loss:.3f})")
        return manifest
    finally:
        torch.set_num_threads(prev_threads)


def _length_bucketed_order(seqs: Sequence[tuple[list[int], int]], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of batches: shuffle, sort within windows of 16 batches by length, shuffle batches.

    Padding to the longest sequence in a batch wastes a third of the compute with random
    batches; bucketing keeps batches random enough while cutting that waste.
    """
    idx = list(range(len(seqs)))
    rng.shuffle(idx)
    window = batch_size * 16
    batches: list[list[int]] = []
    for w in range(0, len(idx), window):
        chunk = sorted(idx[w : w + window], key=lambda i: len(seqs[i][0]))
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    batches = [b for b in batches if len(b) == batch_size] or batches
    rng.shuffle(batches)
    return batches


def _sft(model: Any, seqs: list[tuple[list[int], int]], spec: TinySpec, pad_id: int) -> float:
    """Plain AdamW loop, warmup + cosine; returns the mean loss of the last 20 steps."""
    import torch

    rng = random.Random(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.sft_lr, weight_decay=0.01, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        """Multiplier of ``sft_lr``: linear warmup, then cosine down to 10 %."""
        if step < spec.sft_warmup:
            return (step + 1) / spec.sft_warmup
        progress = (step - spec.sft_warmup) / max(1, spec.sft_steps - spec.sft_warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    order: list[list[int]] = []
    losses: list[float] = []
    model.train()
    for step in range(spec.sft_steps):
        if not order:
            order = _length_bucketed_order(seqs, spec.sft_batch_size, rng)
        idx, order = order[0], order[1:]
        ids, attn, labels = _batch([seqs[i] for i in idx], pad_id)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == spec.sft_steps:
            _log(f"sft step {step + 1}/{spec.sft_steps} loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    tail = losses[-20:] or [float("nan")]
    return sum(tail) / len(tail)


__all__ = [
    "MODEL_DIRNAME",
    "SFT_STEPS_ENV",
    "TinySpec",
    "default_cache_dir",
    "ensure_tiny_model",
    "response_logprobs",
    "sft_preference_accuracy",
]
