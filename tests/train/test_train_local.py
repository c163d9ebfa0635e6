"""End-to-end training in Ray Train local mode (in-process, real DeepSpeed, real Ray Data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from catdpo_ray.config import load_config
from catdpo_ray.train.driver import fit_run, init_ray, prepare_data
from catdpo_ray.train.startup import PHASES
from tests.train.helpers import read_rows, small_corpus


def _cfg(model: str, train: str, test: str, out: Path, *extra: str) -> Any:
    return load_config(None, [f"model.name_or_path={model}", f"data.train={train}", f"data.test={test}",
                              f"output.dir={out}", "scaling.num_workers=0", "train.micro_batch_size=4",
                              "logging.tensorboard=false", *extra])


def _fit(cfg: Any, data: Any, out: Path, name: str) -> Any:
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    result = fit_run(cfg, data, run_dir, name)
    return result


def test_frozen_catdpo_trains_exactly_like_safedpo(tiny_model_dir: str, tmp_path: Path) -> None:
    """catdpo with eta=0, lambda_init=10, agg=max == safedpo with delta=10 on single-category data,
    step by step (same seed, same data)."""
    train, test = small_corpus(tmp_path, 120, 40, single_category=True)
    base = _cfg(tiny_model_dir, train, test, tmp_path, "train.max_steps=6", "train.seed=3")
    init_ray(base)
    data = prepare_data(base, tmp_path / "prep", verbose=False)
    cat = base.replace(["loss.name=catdpo", "dual.eta=0", "dual.lambda_init=10", "dual.agg=max"])
    safe = base.replace(["loss.name=safedpo", "loss.delta=10"])
    r1, r2 = _fit(cat, data, tmp_path, "cat"), _fit(safe, data, tmp_path, "safe")
    assert r1.error is None and r2.error is None
    l1 = [r["loss"] for r in read_rows(r1.run_dir, "step")]
    l2 = [r["loss"] for r in read_rows(r2.run_dir, "step")]
    assert len(l1) == 6 and l1 == l2
    assert l1[0] != l1[-1]  # it did train
    # and the margin mattered: plain DPO on the same data gives different losses
    dpo = base.replace(["loss.name=dpo", "data.pairs=safety_aware"])
    r3 = _fit(dpo, data, tmp_path, "dpo")
    assert [r["loss"] for r in read_rows(r3.run_dir, "step")] != l1


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo", "bdpo"])
def test_every_loss_trains_and_exports(tiny_model_dir: str, tmp_path: Path, loss: str) -> None:
    train, test = small_corpus(tmp_path, 64, 24)
    cfg = _cfg(tiny_model_dir, train, test, tmp_path, f"loss.name={loss}", "train.max_steps=3",
               "train.checkpoint_every=1", "output.num_checkpoints_to_keep=2")
    init_ray(cfg)
    result = _fit(cfg, prepare_data(cfg, tmp_path / "prep", verbose=False), tmp_path, loss)
    assert result.error is None, result.summary.get("error")
    steps = read_rows(result.run_dir, "step")
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["loss"] == r["loss"] for r in steps)  # no NaN
    (startup,) = read_rows(result.run_dir, "startup")  # one worker start, timed phase by phase
    assert startup["step"] == 0 and startup["seconds"]["launch"] is None  # local mode: the driver's own process
    assert list(startup["seconds"])[1:] == list(PHASES[1:]) and all(v >= 0 for v in list(startup["seconds"].values())[1:])
    assert (result.run_dir / "final" / "model.safetensors").exists()
    # local mode: checkpoints live in the run's storage (Ray persists nothing here), newest two kept
    local = tmp_path / "ray_storage" / loss / "local_checkpoints"
    assert sorted(p.name for p in local.iterdir()) == ["checkpoint_000002", "checkpoint_000003"]
    # the model is exported straight into final/ (no copy of it inside the checkpoint), and each checkpoint
    # carries its integrity manifest and the dual state
    assert not (local / "checkpoint_000003" / "hf_model").exists()
    assert (local / "checkpoint_000003" / "catdpo_manifest.rank0.json").exists()
    assert (local / "checkpoint_000003" / "catdpo_state.json").exists()


def test_lora_run_exports_merged_model(tiny_model_dir: str, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    train, test = small_corpus(tmp_path, 64, 24)
    cfg = _cfg(tiny_model_dir, train, test, tmp_path, "model.lora.enabled=true", "model.lora.r=4", "train.max_steps=4",
               "train.lr=5e-3")
    init_ray(cfg)
    result = _fit(cfg, prepare_data(cfg, tmp_path / "prep", verbose=False), tmp_path, "lora")
    assert result.error is None, result.summary.get("error")
    merged = AutoModelForCausalLM.from_pretrained(result.run_dir / "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    mp, bp = dict(merged.named_parameters()), dict(base.named_parameters())
    assert set(mp) == set(bp)  # a plain HF model, no adapter keys
    changed = [k for k in bp if not torch.equal(mp[k], bp[k])]
    assert changed and all(any(m in k for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
                           for k in changed)


def test_shuffle_orders_by_seed_and_reshuffles_each_epoch(tiny_model_dir: str, tmp_path: Path) -> None:
    """With lr 0 and the reference-free SimPO loss, a step's loss depends only on which pairs form the
    batch: so equal loss sequences mean equal data order. Shuffled: another seed gives another order, and
    epoch 2 is not epoch 1 again. Unshuffled: epoch 2 repeats epoch 1. (That the same seed replays the same
    order is what every exact-resume test in tests/faults/ relies on.)"""
    train, test = small_corpus(tmp_path, 48, 24)
    base = _cfg(tiny_model_dir, train, test, tmp_path, "loss.name=simpo", "train.lr=0.0", "train.epochs=2",
                "train.eval_before_after=false", "output.save_final=false")
    init_ray(base)
    data = prepare_data(base, tmp_path / "prep", verbose=False)

    def losses(name: str, *extra: str) -> list[float]:
        cfg = base.replace(list(extra))
        # the driver's shuffle happens in prepare_data: each seed gets its own tokenized order
        prepared = data if not extra else prepare_data(cfg, tmp_path / name, verbose=False)
        result = _fit(cfg, prepared, tmp_path, name)
        assert result.error is None, result.summary.get("error")
        return [r["loss"] for r in read_rows(result.run_dir, "step")]

    a = losses("a")
    other = losses("other", "train.seed=1")
    plain = losses("plain", "train.shuffle=false")
    half = len(a) // 2
    assert len(a) == 2 * half and half >= 4
    assert a[:half] != other[:half]  # the seed sets the order
    assert a[:half] != a[half:]  # epoch 2 is reshuffled
    assert plain[:half] == plain[half:]  # file order, every epoch the same batches


def test_storage_location_passes_uris_through_and_resolves_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from catdpo_ray.train.driver import storage_location

    monkeypatch.chdir(tmp_path)
    assert storage_location(load_config(None, ["output.storage_path=s3://bucket/runs/"])) == "s3://bucket/runs"
    assert storage_location(load_config(None, ["output.storage_path=rel/store"])) == str(tmp_path / "rel" / "store")
    assert storage_location(load_config(None, ["output.dir=out"])) == str(tmp_path / "out" / "ray_storage")


def test_generation_violation_signal_drives_lambda_exactly(tiny_model_dir: str, tmp_path: Path) -> None:
    """dual.violation=generation end to end: every 2 steps the policy's sampled answers are judged; the
    logged (n, v) are exactly the written verdicts, and lambda is a bit-for-bit replay of them."""
    import json

    from tests.train.helpers import check_generation_rounds, read_lambdas_csv, replay_dual

    train, test = small_corpus(tmp_path, 64, 24)
    cfg = _cfg(tiny_model_dir, train, test, tmp_path, "train.max_steps=6", "dual.violation=generation",
               "dual.generation_every=2", "dual.generation_prompts_per_category=2", "dual.generation_max_new_tokens=12",
               "dual.eta=2.0", "train.eval_before_after=false")
    init_ray(cfg)
    result = _fit(cfg, prepare_data(cfg, tmp_path / "prep", verbose=False), tmp_path, "gen")
    assert result.error is None, result.summary.get("error")
    steps = read_rows(result.run_dir, "step")
    check_generation_rounds(result.run_dir, steps, every=2)
    assert [r[1:] for r in read_lambdas_csv(result.run_dir)] == replay_dual(cfg, steps)
    rates = [json.loads(line) for line in (result.run_dir / "onpolicy.jsonl").read_text().splitlines()
             if '"kind": "rate"' in line]
    assert all(set(r["unsafe_rate"]) == set(cfg.data.categories) for r in rates)
