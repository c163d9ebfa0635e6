"""Reference log-probs as a cached Ray Data stage: parity with the online computation a worker
does, batch-composition independence, B-DPO's start token, the fingerprint, the cache's
integrity checks, where a cache miss is scored (this process on CPUs, an actor pool on GPUs), and
(with Ray) that a warm cache loads no model in any process."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from catdpo_ray.config import RunConfig, load_config
from catdpo_ray.data.fingerprint import (
    MANIFEST,
    UncacheableError,
    batch_row_keys,
    fingerprint,
    read_entry,
    resolve_hub_revision,
    row_key,
    write_entry,
)
from catdpo_ray.data.reference import (
    REF_COLUMNS,
    RESP_COLUMNS,
    ReferenceScorer,
    attach_reference,
    default_reference_cache_dir,
    fingerprint_inputs,
    resolve_reference_mode,
)
from catdpo_ray.data.tokenize import PairTokenizer, collate_pairs, response_start_id
from catdpo_ray.losses import sequence_logps

PAIR_MODE = {"dpo": "safe_better", "safedpo": "safety_aware", "catdpo": "safety_aware", "bdpo": "harmless"}
TOL = 1e-5


def _cfg(tiny: str, loss: str = "catdpo", *extra: str) -> RunConfig:
    return load_config(None, [f"model.name_or_path={tiny}", f"loss.name={loss}", *extra])


def _tokenized(cfg: RunConfig, tokenizer_path: str, n: int) -> dict[str, np.ndarray]:
    """The first ``n`` pairs of the bundled train split (the loss's pair mode), tokenized in-process."""
    from catdpo_ray.data.loader import load_split

    pairs, _ = load_split(cfg.data, "train", pair_mode=cfg.pair_mode, require_categories=False, quarantine_path=None)
    pairs = pairs[:n]
    tok = PairTokenizer(tokenizer_path, prompt_template=cfg.data.prompt_template, use_chat_template=False,
                        max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length)
    batch = {k: np.array([p[k] for p in pairs], dtype=object) for k in
             ("prompt", "chosen", "rejected", "safety_gap", "chosen_safe", "rejected_safe")}
    batch["categories"] = np.array([np.asarray(p["categories"]) for p in pairs], dtype=object)
    out = tok(batch)
    for name in ("chosen_ids", "rejected_ids"):  # object arrays of int32 rows, as Ray hands them to actors
        ragged = np.empty(n, dtype=object)
        ragged[:] = out[name]
        out[name] = ragged
    cats = np.empty(n, dtype=object)
    cats[:] = out["categories"]
    out["categories"] = cats
    return out


@torch.no_grad()
def _online(model: torch.nn.Module, batch: dict[str, Any], *, micro: int, pad_id: int, start_id: int | None,
            bdpo: bool) -> dict[str, np.ndarray]:
    """What a worker computes online (``Models.reference_logps`` with a frozen reference): the
    same collate and ``sequence_logps`` over the loop's micro-batches, in data order."""
    n = len(batch["chosen_start"])
    out: dict[str, list[np.ndarray]] = {c: [] for c in REF_COLUMNS + RESP_COLUMNS}
    for lo in range(0, n, micro):
        b = collate_pairs({k: v[lo : lo + micro] for k, v in batch.items()}, pad_id=pad_id, bos_id=start_id,
                          with_response_only=bdpo)
        size = b["safety_gap"].shape[0]
        ref = sequence_logps(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits,
                             b["input_ids"], b["loss_mask"])[0]
        out["ref_chosen_logps"].append(ref[:size].numpy())
        out["ref_rejected_logps"].append(ref[size:].numpy())
        if bdpo:
            logits = model(input_ids=b["resp_input_ids"], attention_mask=b["resp_attention_mask"], use_cache=False).logits
            resp = sequence_logps(logits, b["resp_input_ids"], b["resp_loss_mask"])[0]
            out["ref_resp_chosen_logps"].append(resp[:size].numpy())
            out["ref_resp_rejected_logps"].append(resp[size:].numpy())
    return {k: np.concatenate(v) for k, v in out.items() if v}


# ---------------------------------------------------------------------------------------------
# scorer parity, in-process


@pytest.mark.parametrize("loss", ["dpo", "safedpo", "catdpo", "bdpo"])
def test_scorer_equals_the_online_worker_computation(tiny_model_dir: str, loss: str) -> None:
    from catdpo_ray.train.modeling import load_causal_lm

    cfg = _cfg(tiny_model_dir, loss)
    assert cfg.pair_mode == PAIR_MODE[loss]
    batch = _tokenized(cfg, tiny_model_dir, 24)
    scorer = ReferenceScorer(cfg.to_dict(), tiny_model_dir, tiny_model_dir, micro_batch_size=16, num_threads=1)
    got = scorer(batch)
    model = load_causal_lm(cfg, tiny_model_dir).eval()
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_model_dir)
    want = _online(model, batch, micro=cfg.train.micro_batch_size, pad_id=t.pad_token_id, start_id=t.bos_token_id,
                   bdpo=loss == "bdpo")
    assert sorted(k for k in got if k.startswith("ref_")) == sorted(want)
    assert len(want) == (4 if loss == "bdpo" else 2)
    for name, values in want.items():
        assert got[name].dtype == np.float32 and got[name].shape == (24,)
        np.testing.assert_allclose(got[name], values, rtol=0, atol=TOL, err_msg=name)
    assert (got["ref_chosen_logps"] < 0).all() and not np.allclose(got["ref_chosen_logps"], got["ref_rejected_logps"])
    assert got["row_key"].tolist() == batch_row_keys(batch).tolist()


def test_scores_do_not_depend_on_batch_composition(tiny_model_dir: str) -> None:
    """Micro-batch 1 (no padding) vs 16 (much padding) vs the rows reversed: same numbers."""
    cfg = _cfg(tiny_model_dir, "bdpo")
    batch = _tokenized(cfg, tiny_model_dir, 20)
    lengths = [len(c) for c in batch["chosen_ids"]] + [len(r) for r in batch["rejected_ids"]]
    assert max(lengths) - min(lengths) >= 10  # real padding in a shared micro-batch
    alone = ReferenceScorer(cfg.to_dict(), tiny_model_dir, tiny_model_dir, micro_batch_size=1, num_threads=1)
    a = alone(batch)
    alone.micro_batch_size = 16
    b = alone(batch)
    rev = alone({k: v[::-1] for k, v in batch.items()})
    for name in REF_COLUMNS + RESP_COLUMNS:
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=TOL, err_msg=name)
        np.testing.assert_allclose(rev[name][::-1], a[name], rtol=0, atol=TOL, err_msg=name)


@torch.no_grad()
def test_lora_runs_score_the_base_model_which_equals_the_disabled_adapter(tiny_model_dir: str) -> None:
    """The online LoRA reference is the policy with its adapter disabled; with a non-zero adapter
    (B perturbed) that must still equal the scorer's base model, and differ from the adapted one."""
    from catdpo_ray.train.modeling import apply_lora, load_causal_lm

    cfg = _cfg(tiny_model_dir, "dpo", "model.lora.enabled=true")
    batch = _tokenized(cfg, tiny_model_dir, 8)
    got = ReferenceScorer(cfg.to_dict(), tiny_model_dir, tiny_model_dir, num_threads=1)(batch)
    torch.manual_seed(0)
    policy = apply_lora(cfg, load_causal_lm(cfg, tiny_model_dir)).eval()
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            param.add_(0.05 * torch.randn_like(param))
    b = collate_pairs(batch, pad_id=0)
    with policy.disable_adapter():
        off = sequence_logps(policy(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                             b["input_ids"], b["loss_mask"])[0]
    on = sequence_logps(policy(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                        b["input_ids"], b["loss_mask"])[0]
    ref = np.concatenate([got["ref_chosen_logps"], got["ref_rejected_logps"]])
    np.testing.assert_allclose(ref, off.numpy(), rtol=0, atol=TOL)
    assert np.abs(ref - on.numpy()).max() > 1e-3  # the adapter does change the function


# ---------------------------------------------------------------------------------------------
# B-DPO start token


@pytest.fixture(scope="module")
def no_bos_tokenizer(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny tokenizer saved without a BOS token (like Qwen's)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.bos_token = None
    out = tmp_path_factory.mktemp("nobos")
    tok.save_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).bos_token_id is None
    return str(out)


def test_response_only_pass_scores_every_response_token_without_bos(tiny_model_dir: str, no_bos_tokenizer: str) -> None:
    """Before the fix the first response token was never scored in log p(y) without a BOS: the
    response-only pass scored |y| - 1 tokens while log p(y|x) scored |y|."""
    from transformers import AutoTokenizer

    from catdpo_ray.train.modeling import load_causal_lm

    cfg = _cfg(tiny_model_dir, "bdpo")
    batch = _tokenized(cfg, no_bos_tokenizer, 6)
    t = AutoTokenizer.from_pretrained(no_bos_tokenizer)
    assert batch["chosen_ids"][0][0] != AutoTokenizer.from_pretrained(tiny_model_dir).bos_token_id
    with pytest.raises(ValueError, match="response_start_id"):
        collate_pairs(batch, pad_id=t.pad_token_id, bos_id=None, with_response_only=True)
    assert response_start_id(t) == t.eos_token_id
    b = collate_pairs(batch, pad_id=t.pad_token_id, bos_id=response_start_id(t), with_response_only=True)
    assert b["resp_loss_mask"].sum(1).tolist() == b["loss_mask"].sum(1).tolist()
    assert (b["resp_input_ids"][:, 0] == t.eos_token_id).all()

    # log p(y) by hand: full log-softmax after [EOS] + y, every response token, y_1 included.
    model = load_causal_lm(cfg, tiny_model_dir).eval()
    scored = ReferenceScorer(cfg.to_dict(), tiny_model_dir, no_bos_tokenizer, num_threads=1)(batch)
    for i in range(6):
        y = [int(v) for v in batch["chosen_ids"][i][int(batch["chosen_start"][i]) :]]
        ids = torch.tensor([[t.eos_token_id, *y]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)[0]
        by_hand = sum(float(logp[pos, tok]) for pos, tok in enumerate(y))
        assert scored["ref_resp_chosen_logps"][i] == pytest.approx(by_hand, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# fingerprint


def test_row_key_separates_prompt_from_response() -> None:
    base = row_key([1, 2, 3, 4], 2, [1, 2, 5], 2)
    assert base == row_key(np.array([1, 2, 3, 4], dtype=np.int32), 2, [1, 2, 5], 2)  # dtype-free
    assert len({base, row_key([1, 2, 3, 4], 3, [1, 2, 5], 2), row_key([1, 2, 3, 4], 2, [1, 2, 6], 2),
                row_key([1, 2, 3], 2, [4, 1, 2, 5], 2)}) == 4


def test_fingerprint_changes_with_each_input(tiny_model_dir: str, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    memo = tmp_path / "memo.json"
    keys = np.asarray([row_key([1, i], 1, [1, i + 1], 1) for i in range(5)], dtype="S32")
    cfg = _cfg(str(model))

    def fp(c: RunConfig = cfg, k: np.ndarray = keys) -> str:
        return fingerprint(fingerprint_inputs(c, str(model), str(model), k, memo=memo))

    base = fp()
    assert fp() == base and fp(k=keys[::-1]) == base  # deterministic; order-free (rows join by key)
    variants = {
        "pairs": fp(k=np.concatenate([keys[:4], [row_key([1, 9], 1, [1, 9], 1)]])),
        "max_length": fp(_cfg(str(model), "catdpo", "data.max_length=96")),
        "max_prompt_length": fp(_cfg(str(model), "catdpo", "data.max_prompt_length=32")),
        "template": fp(_cfg(str(model), "catdpo", 'data.prompt_template="Q: {prompt} A:"')),
        "chat": fp(_cfg(str(model), "catdpo", "data.use_chat_template=true")),
        "dtype": fp(_cfg(str(model), "catdpo", "train.precision=bf16")),
        "attention": fp(_cfg(str(model), "catdpo", "model.attn_implementation=eager")),
        "bdpo_columns": fp(_cfg(str(model), "bdpo")),
    }
    assert fp(_cfg(str(model), "safedpo")) == base  # same pairs, same columns: safedpo reuses catdpo's entry
    cfg_json = (model / "tokenizer_config.json").read_text()
    (model / "tokenizer_config.json").write_text(cfg_json.replace('"padding_side": "right"', '"padding_side": "left"'))
    variants["tokenizer"] = fp()
    (model / "tokenizer_config.json").write_text(cfg_json)
    assert fp() == base
    weights = model / "model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: the memo must still notice
    variants["weights"] = fp()
    assert len(set(variants.values()) | {base}) == len(variants) + 1, variants


def test_hub_models_need_a_resolvable_commit(tiny_model_dir: str) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert resolve_hub_revision("org/model", commit) == commit  # immutable: no network needed
    with pytest.raises(UncacheableError, match="'no-such-org/no-such-model'.*will not be cached"):
        resolve_hub_revision("no-such-org/no-such-model", None)


def test_reference_mode_and_cache_dir(tiny_model_dir: str, tmp_path: Path) -> None:
    assert resolve_reference_mode(_cfg(tiny_model_dir, "dpo")) == "precompute"
    assert resolve_reference_mode(_cfg(tiny_model_dir, "simpo", "model.reference=precompute")) == "none"
    assert resolve_reference_mode(_cfg(tiny_model_dir, "ipo", "model.reference=online")) == "online"
    assert default_reference_cache_dir(_cfg(tiny_model_dir, "dpo", f"model.cache_dir={tmp_path}")) == tmp_path / "reference_cache"
    assert default_reference_cache_dir(_cfg(tiny_model_dir, "dpo", f"model.reference_cache_dir={tmp_path}/r")) == tmp_path / "r"


# ---------------------------------------------------------------------------------------------
# cache entries


def _table(n: int = 5) -> dict[str, np.ndarray]:
    keys = np.sort(np.asarray([row_key([i], 0, [i], 0) for i in range(n)], dtype="S32"))
    return {"row_key": keys, "ref_chosen_logps": -np.arange(n, dtype=np.float32),
            "ref_rejected_logps": -2 * np.arange(n, dtype=np.float32)}


def test_cache_entry_round_trip_and_every_corruption_is_detected(tmp_path: Path) -> None:
    table = _table()
    entry = write_entry(tmp_path, "k1", table, {"x": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k1"]  # no temporary directory left behind
    got, reason = read_entry(tmp_path, "k1", expected_rows=5)
    assert reason == "hit" and got is not None and np.array_equal(got["ref_rejected_logps"], table["ref_rejected_logps"])
    assert read_entry(tmp_path, "k1", expected_rows=6) == (None, f"entry {entry}: 5 rows, the split has 6")
    assert read_entry(tmp_path, "k2", expected_rows=5) == (None, "no entry")

    col = entry / "ref_chosen_logps.npy"
    good = col.read_bytes()
    col.write_bytes(good[:-4])  # truncated
    assert "ref_chosen_logps.npy has" in read_entry(tmp_path, "k1", expected_rows=5)[1]
    col.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))  # same size, one byte changed
    assert read_entry(tmp_path, "k1", expected_rows=5)[1].endswith("ref_chosen_logps.npy sha256 mismatch")
    (entry / MANIFEST).unlink()  # what a crash before the rename would look like had we not renamed
    assert read_entry(tmp_path, "k1", expected_rows=5)[1] == f"partial entry {entry}: no {MANIFEST}"

    write_entry(tmp_path, "k1", table, {"x": 1})  # a corrupt entry is replaced, atomically
    assert read_entry(tmp_path, "k1", expected_rows=5)[1] == "hit"
    assert json.loads((entry / MANIFEST).read_text())["rows"] == 5


def test_attach_refuses_rows_the_table_does_not_cover() -> None:
    import pyarrow as pa

    rows = pa.table({"chosen_ids": [[1, 2], [1, 3]], "chosen_start": [1, 1], "rejected_ids": [[1, 4], [1, 5]],
                     "rejected_start": [1, 1]})
    keys = [row_key([1, 2], 1, [1, 4], 1), row_key([1, 3], 1, [1, 5], 1)]
    order = np.argsort(keys)
    table = {"row_key": np.asarray(keys, dtype="S32")[order], "ref_chosen_logps": np.asarray([-1.0, -2.0], np.float32)[order],
             "ref_rejected_logps": np.asarray([-3.0, -4.0], np.float32)[order]}
    out = attach_reference(rows, table=table, split_name="train")
    assert out.column("ref_chosen_logps").to_pylist() == [-1.0, -2.0]
    assert out.column("ref_rejected_logps").to_pylist() == [-3.0, -4.0]
    partial = {k: v[:1] for k, v in table.items()}
    with pytest.raises(KeyError, match="train split: 1 of 2 rows have no reference log-probs"):
        attach_reference(rows, table=partial, split_name="train")


def test_collate_passes_reference_columns_through(tiny_model_dir: str) -> None:
    cfg = _cfg(tiny_model_dir)
    batch = _tokenized(cfg, tiny_model_dir, 3)
    batch["ref_chosen_logps"] = np.asarray([-1.5, -2.5, -3.5], dtype=np.float32)
    out = collate_pairs(batch, pad_id=0)
    assert out["ref_chosen_logps"].dtype == torch.float32 and out["ref_chosen_logps"].tolist() == [-1.5, -2.5, -3.5]


# ---------------------------------------------------------------------------------------------
# the stage: cold, warm (no scoring anywhere), corrupt -> recomputed; driver or actor pool

@pytest.fixture
def loads(ray_session: None, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The reference model loads (ReferenceScorer constructions) made in this process, with Ray up."""
    made: list[int] = []
    original = ReferenceScorer.__init__

    def counted(self: ReferenceScorer, *args: Any, **kwargs: Any) -> None:
        made.append(os.getpid())
        original(self, *args, **kwargs)

    monkeypatch.setattr(ReferenceScorer, "__init__", counted)
    return made


def test_scoring_place_is_the_driver_on_cpus_and_an_actor_pool_on_gpus(tiny_model_dir: str) -> None:
    from catdpo_ray.data.reference import scoring_place

    assert scoring_place(_cfg(tiny_model_dir)) == "driver"
    assert scoring_place(_cfg(tiny_model_dir, "catdpo", "scaling.use_gpu=true")) == "actors"


@pytest.mark.slow
def test_stage_cold_warm_corrupt(tiny_model_dir: str, tmp_path: Path, loads: list[int],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """B-DPO columns on a CPU run: cold computes in this process (1 load) and equals the online
    numbers; warm scores nothing anywhere; a truncated file is recomputed (1 more load) and repaired;
    order is kept."""
    import ray.data

    from catdpo_ray.data import reference
    from catdpo_ray.data.reference import add_reference_columns, dataset_row_keys
    from catdpo_ray.train.modeling import load_causal_lm

    cfg = _cfg(tiny_model_dir, "bdpo")
    batch = _tokenized(cfg, tiny_model_dir, 40)
    rows = [{k: batch[k][i] for k in batch} for i in range(40)]
    ds = ray.data.from_items(rows, override_num_blocks=3).materialize()
    cache = tmp_path / "cache"
    kw = {"cfg": cfg, "model_path": tiny_model_dir, "tokenizer_path": tiny_model_dir, "split_name": "train",
          "cache_dir": cache}

    cold, info = add_reference_columns(ds, **kw)
    assert (info["hit"], info["reason"], info["scored_in"], len(loads)) == (False, "no entry", "driver", 1)
    assert dataset_row_keys(cold).tolist() == batch_row_keys(batch).tolist()  # same rows, same order
    got = cold.take_batch(40, batch_format="numpy")
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_model_dir)
    want = _online(load_causal_lm(cfg, tiny_model_dir).eval(), batch, micro=cfg.train.micro_batch_size,
                   pad_id=t.pad_token_id, start_id=t.bos_token_id, bdpo=True)
    for name in REF_COLUMNS + RESP_COLUMNS:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=TOL, err_msg=name)

    def no_scoring(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a warm cache scored pairs")

    with monkeypatch.context() as m:  # the stage's only two ways to load a model: neither is taken
        m.setattr(reference, "score_in_driver", no_scoring)
        m.setattr(reference, "score_on_actors", no_scoring)
        warm, info = add_reference_columns(ds, **kw)
    assert (info["hit"], info["reason"], info["scored_in"], len(loads)) == (True, "hit", None, 1)
    warm_batch = warm.take_batch(40, batch_format="numpy")
    for name in REF_COLUMNS + RESP_COLUMNS:
        assert np.array_equal(warm_batch[name], got[name]), name

    victim = Path(info["entry"]) / "ref_resp_rejected_logps.npy"
    victim.write_bytes(victim.read_bytes()[:-8])
    again, info = add_reference_columns(ds, **kw)
    assert not info["hit"] and "ref_resp_rejected_logps.npy has" in info["reason"] and len(loads) == 2
    assert np.allclose(again.take_batch(40, batch_format="numpy")["ref_resp_rejected_logps"],
                       got["ref_resp_rejected_logps"], rtol=0, atol=TOL)
    assert read_entry(cache, info["fingerprint"], expected_rows=40)[1] == "hit"  # repaired

    simpo, info = add_reference_columns(ds, **{**kw, "cfg": _cfg(tiny_model_dir, "simpo")})
    assert simpo is ds and info["mode"] == "none" and len(loads) == 2  # reference-free: nothing built


@pytest.mark.slow
def test_actor_pool_scores_what_the_driver_scores(tiny_model_dir: str, loads: list[int]) -> None:
    """The GPU runs' path (one Ray Data actor per GPU) run with a CPU actor: it loads the model in a Ray
    worker, not here, and returns the driver's numbers for the same rows (B-DPO: all four columns)."""
    from catdpo_ray.data.reference import score_in_driver, score_on_actors
    from catdpo_ray.data.tables import batch_to_table

    cfg = _cfg(tiny_model_dir, "bdpo")
    table = batch_to_table(_tokenized(cfg, tiny_model_dir, 40))
    pool = score_on_actors(table, cfg, tiny_model_dir, tiny_model_dir, 16)
    assert loads == []  # scored, and not by a model loaded in this process
    here = score_in_driver(table, cfg, tiny_model_dir, tiny_model_dir, 16)
    assert loads == [os.getpid()]
    assert set(pool) == set(here) == {"row_key", *REF_COLUMNS, *RESP_COLUMNS}
    order_pool, order_here = np.argsort(pool["row_key"]), np.argsort(here["row_key"])
    assert np.array_equal(pool["row_key"][order_pool], here["row_key"][order_here])
    assert len(set(here["row_key"].tolist())) == 40 and here["row_key"].dtype == np.dtype("S32")
    for name in REF_COLUMNS + RESP_COLUMNS:
        assert pool[name].dtype == here[name].dtype == np.float32
        np.testing.assert_allclose(pool[name][order_pool], here[name][order_here], rtol=0, atol=TOL, err_msg=name)
