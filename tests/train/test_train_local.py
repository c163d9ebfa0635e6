"""End-to-end training in Ray Train local mode (in-process, real DeepSpeed, real Ray Data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from catdpo_ray.config import load_config
from catdpo_ray.train.driver import fit_run, init_ray, prepare_data
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
    assert (result.run_dir / "final" / "model.safetensors").exists()
    # local mode: checkpoints live in the run's storage (Ray persists nothing here), newest two kept
    local = tmp_path / "ray_storage" / loss / "local_checkpoints"
    assert sorted(p.name for p in local.iterdir()) == ["checkpoint_000002", "checkpoint_000003"]
    assert (local / "checkpoint_000003" / "hf_model" / "model.safetensors").exists()


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
