"""Real 2-worker Ray Train + DeepSpeed runs on CPU (gloo), where collectives matter.

ZeRO-2: a dataset whose size is not a multiple of the global batch, with the on-policy (generation)
violation signal; lambda equals a replay of DualState over the logged global (n, v); every rank held bit-identical lambda at every step; the
margin-free loss falls; final/ loads and beats the reference on held-out preference accuracy,
measured here independently of the trainer's own evaluation.
ZeRO-3: a run stopped after a checkpoint resumes with the same run name at the saved step, with
the saved lambda and optimizer state, and finishes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from catdpo_ray.config import load_config
from catdpo_ray.train.driver import run_training
from catdpo_ray.train.startup import PHASES
from tests.train.helpers import check_generation_rounds, read_lambdas_csv, read_rows, replay_dual, small_corpus

pytestmark = pytest.mark.slow


def _likelihood_accuracy(model_dir: str, test_file: str, tokenizer_dir: str) -> float:
    """Share of held-out safety-gap pairs where the model's mean log-prob prefers the safe answer."""
    from transformers import AutoModelForCausalLM

    from catdpo_ray.config import DataConfig
    from catdpo_ray.data.loader import load_split
    from catdpo_ray.data.tokenize import PairTokenizer, collate_pairs
    from catdpo_ray.losses import sequence_logps

    pairs, _ = load_split(DataConfig(test=test_file), "test", pair_mode="safety_aware")
    pairs = [p for p in pairs if p["safety_gap"] == 1]
    tok = PairTokenizer(tokenizer_dir, prompt_template="USER: {prompt} ASSISTANT:", use_chat_template=False,
                        max_length=128, max_prompt_length=64)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    correct = 0
    for i in range(0, len(pairs), 16):
        chunk = pairs[i : i + 16]
        cols = {k: [p[k] for p in chunk] for k in chunk[0]}
        b = collate_pairs(tok(cols), pad_id=tok.tokenizer.pad_token_id)
        with torch.no_grad():
            s, n = sequence_logps(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                  b["input_ids"], b["loss_mask"])
        mean = s / n
        correct += int((mean[: len(chunk)] > mean[len(chunk) :]).sum())
    return correct / len(pairs)


def test_zero2_two_workers_odd_dataset(tiny_model_dir: str, tmp_path: Path) -> None:
    train, test = small_corpus(tmp_path, 310, 100)
    cfg = load_config(None, [
        f"model.name_or_path={tiny_model_dir}", f"data.train={train}", f"data.test={test}", f"output.dir={tmp_path}",
        "output.name=z2", f"output.storage_path=file://{tmp_path}/store", "scaling.num_workers=2", "train.zero_stage=2", "train.micro_batch_size=8", "train.epochs=2",
        "train.eval_every=10", "logging.tensorboard=true", "dual.check_every=1",
        # the on-policy violation signal with 2 ZeRO-2 ranks (each generates its share of the prompts with
        # its full replica; the counts are summed like (n, v)): a round every 8 steps, 1 prompt per category
        "dual.violation=generation", "dual.generation_every=8", "dual.generation_prompts_per_category=1",
        "dual.generation_max_new_tokens=8",
    ])
    result = run_training(cfg)
    assert result.error is None, result.summary.get("error")
    run = result.run_dir
    pairs = result.summary["data"]["train"]["pairs"]
    assert pairs % cfg.global_batch_size != 0, "the point is an odd dataset size"
    steps = read_rows(run, "step")
    assert [r["step"] for r in steps] == list(range(1, 2 * (pairs // 16) + 1))
    (startup,) = read_rows(run, "startup")  # rank 0's start, phase by phase, its launch included
    assert startup["step"] == 0 and list(startup["seconds"]) == list(PHASES)
    assert all(v >= 0 for v in startup["seconds"].values()) and startup["seconds"]["launch"] > 0
    # lambda in lambdas.csv == a replay of DualState over the logged global (n, v), bit for bit
    logged = read_lambdas_csv(run)
    assert [int(r[0]) for r in logged] == [r["step"] for r in steps]
    assert [r[1:] for r in logged] == replay_dual(cfg, steps)
    assert max(max(r[1:]) for r in logged) > 0, "lambda moved"
    check_generation_rounds(run, steps, every=8)
    # every rank held bit-identical lambda at every step (all-gathered and compared in the loop)
    assert all(len(r["lambda_digests"]) == 2 and len(set(r["lambda_digests"])) == 1 for r in steps)
    # the margin-free DPO loss falls
    dpo = [r["dpo_loss"] for r in steps]
    assert sum(dpo[-5:]) / 5 < sum(dpo[:5]) / 5 - 0.05, dpo
    # periodic held-out evaluation happened and landed in metrics.jsonl
    n = len(steps)
    assert [r["step"] for r in read_rows(run, "eval")] == [*range(10, n, 10), n]
    for name in ("config.yaml", "summary.json", "lambdas.png", "before_after.md", "data_report.json"):
        assert (run / name).exists(), name
    assert any((run / "tensorboard").iterdir())
    # a storage URI goes to Ray as it is (file:// here; s3:// and gs:// take the same path): checkpoints land there
    assert [p for p in (tmp_path / "store" / "z2").glob("checkpoint_*") if p.is_dir()]
    assert not (tmp_path / "ray_storage").exists() and not list(tmp_path.glob("file:*"))
    # final/ loads with from_pretrained and beats the reference on held-out preference accuracy
    after = _likelihood_accuracy(str(run / "final"), test, tiny_model_dir)
    before = _likelihood_accuracy(tiny_model_dir, test, tiny_model_dir)
    assert after > before, (before, after)
    final_eval = result.summary["final_eval"]
    assert final_eval["eval/macro"] > final_eval["eval/ref_macro"]


def test_zero3_stop_and_resume_same_name(tiny_model_dir: str, tmp_path: Path) -> None:
    train, test = small_corpus(tmp_path, 300, 120)
    common = [f"model.name_or_path={tiny_model_dir}", f"data.train={train}", f"data.test={test}", f"output.dir={tmp_path}",
              "output.name=z3", "scaling.num_workers=2", "train.zero_stage=3", "train.micro_batch_size=8",
              "train.max_steps=10", "train.checkpoint_every=4", "logging.tensorboard=false", "dual.check_every=1",
              # the on-policy violation signal under ZeRO-3 (generation gathers the partitioned weights): a round
              # every 3 steps, one prompt per category, rounds 6 and 9 after the resume at step 4
              "dual.violation=generation", "dual.generation_every=3", "dual.generation_prompts_per_category=1",
              "dual.generation_max_new_tokens=8"]
    staged_before = set(Path(tempfile.gettempdir()).glob("catdpo-ckpt-*"))
    first = run_training(load_config(None, [*common, "train.stop_after_step=4"]))
    assert first.error is not None and "stop_after_step" in str(first.summary.get("error"))
    run = first.run_dir
    before = read_rows(run, "step")
    assert [r["step"] for r in before] == [1, 2, 3, 4]
    saved_lambdas = before[-1]["lambdas"]
    assert not (run / "final").exists()

    second = run_training(load_config(None, common))
    assert second.error is None, second.summary.get("error")
    resume = [r for r in read_rows(run, "resume") if r["from_checkpoint"]]  # (step 0: the first attempt's start)
    assert len(resume) == 1 and resume[0]["step"] == 4 and resume[0]["checkpoint"] == "checkpoint_000004"
    assert resume[0]["lambdas"] == saved_lambdas  # the MarginController was re-seeded, lambda did not reset
    assert resume[0]["engine_global_steps"] == 4  # DeepSpeed engine state restored
    assert resume[0]["optimizer_steps"] == 4  # Adam moments restored (their step count), not re-initialised
    steps = read_rows(run, "step")
    assert [r["step"] for r in steps] == list(range(1, 11))  # no step twice, none missing
    # the first resumed step used the saved lambda on every rank
    from catdpo_ray.train.worker import _digest

    assert steps[4]["lambda_digests"] == [_digest(torch.tensor(saved_lambdas, dtype=torch.float64))] * 2
    assert [r[1:] for r in read_lambdas_csv(run)] == replay_dual(load_config(None, common), steps)
    assert all(len(r["lambda_digests"]) == 2 and len(set(r["lambda_digests"])) == 1 for r in steps)
    dpo = [r["dpo_loss"] for r in steps]
    assert sum(dpo[-4:]) / 4 < sum(dpo[:4]) / 4 - 0.05, dpo
    check_generation_rounds(run, steps, every=3)
    # final/ (16-bit-gathered ZeRO-3 export) loads and beats the reference on held-out accuracy
    after = _likelihood_accuracy(str(run / "final"), test, tiny_model_dir)
    before = _likelihood_accuracy(tiny_model_dir, test, tiny_model_dir)
    assert after > before, (before, after)
    # staged checkpoint copies are removed once Ray has persisted them (4 checkpoints + final here)
    assert set(Path(tempfile.gettempdir()).glob("catdpo-ckpt-*")) == staged_before
    kept = [p for p in (tmp_path / "ray_storage" / "z3").glob("checkpoint_*") if p.is_dir()]
    assert len(kept) == 2  # output.num_checkpoints_to_keep

