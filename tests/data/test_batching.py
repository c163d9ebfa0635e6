"""Exact micro-batches, length grouping, padding share and padding-free packing.

What these tests prove: re-chunking a ragged stream yields exactly ``micro_batch_size`` rows per
micro-batch in stream order and counts the dropped remainder (and fixes the short batches a real
Ray local shuffle buffer emits); length grouping permutes rows only within windows, keeps the
micro-batch count, lowers padding and is resume-exact; packed and padded per-sequence log-probs
(and a parameter's gradient) agree on real HF Llama models; and packed sequences do not attend
to each other (a test that fails when they do).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from catdpo_ray.data.batching import (
    ExactMicroBatches,
    batch_token_counts,
    collate_packed,
    length_grouped,
    micro_batch_stream,
    packed_forward_logps,
    packed_sequence_logps,
    packs_into_one_row,
    padding_share,
    pair_lengths,
    supports_packing,
)
from catdpo_ray.data.tokenize import collate_pairs
from catdpo_ray.losses import sequence_logps

# ---- helpers


def _ragged_stream(sizes: list[int]) -> list[dict[str, np.ndarray]]:
    """Numpy batches of the given sizes over rows 0..sum-1: ``x`` the row id, ``v`` a list column."""
    out, start = [], 0
    for n in sizes:
        ids = np.arange(start, start + n)
        out.append({"x": ids, "v": np.stack([ids, -ids], axis=1)})
        start += n
    return out


def _pairs(lengths: list[tuple[int, int]], seed: int = 0, prompt: int = 3) -> dict[str, np.ndarray]:
    """A tokenized-pairs numpy batch with the given (chosen, rejected) lengths; BOS=1, ids 3..2047."""
    rng = np.random.default_rng(seed)

    def seq(n: int) -> np.ndarray:
        return np.asarray([1, *rng.integers(3, 2048, n - 1)], dtype=np.int32)

    b = len(lengths)
    chosen = np.empty(b, dtype=object)
    rejected = np.empty(b, dtype=object)
    for i, (c, r) in enumerate(lengths):
        chosen[i], rejected[i] = seq(c), seq(r)
    return {
        "chosen_ids": chosen, "rejected_ids": rejected,
        "chosen_start": np.array([min(prompt, c - 1) for c, _ in lengths]),
        "rejected_start": np.array([min(prompt, r - 1) for _, r in lengths]),
        "safety_gap": np.arange(b) % 2, "categories": np.eye(3, dtype=np.int8)[np.arange(b) % 3],
        "chosen_safe": np.ones(b, dtype=np.int64), "rejected_safe": np.zeros(b, dtype=np.int64),
    }


def _rows(batch: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    return {k: v[i : i + 1] for k, v in batch.items()}


# ---- 1. exact micro-batches


def test_ragged_stream_becomes_exact_micro_batches_in_order() -> None:
    exact = ExactMicroBatches(_ragged_stream([3, 8, 1, 5, 0, 8, 2, 7]), 8)  # 34 rows, one empty batch
    out = list(exact)
    assert [len(mb["x"]) for mb in out] == [8, 8, 8, 8]
    assert np.array_equal(np.concatenate([mb["x"] for mb in out]), np.arange(32))
    assert np.array_equal(out[1]["v"], np.stack([np.arange(8, 16), -np.arange(8, 16)], axis=1))
    assert (exact.micro_batches, exact.dropped_rows) == (4, 2)
    with pytest.raises(RuntimeError, match="single-pass"):
        list(exact)


def test_list_column_2d_in_one_batch_and_object_in_the_next_is_joined() -> None:
    # Ray gives a list column as a 2-D array when its rows have equal lengths, else as an object array.
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.array([7, 8, 9]), np.array([5])
    stream = [{"ids": np.array([[1, 2], [3, 4]])}, {"ids": ragged}]
    (mb,) = list(ExactMicroBatches(stream, 3))
    assert mb["ids"].dtype == object and [list(r) for r in mb["ids"]] == [[1, 2], [3, 4], [7, 8, 9]]


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="micro_batch_size must be > 0, got 0"):
        ExactMicroBatches([], 0)
    with pytest.raises(ValueError, match=r"ragged numpy batch: columns have row counts \{'a': 2, 'b': 1\}"):
        list(ExactMicroBatches([{"a": np.zeros(2), "b": np.zeros(1)}], 2))


def test_real_ray_local_shuffle_emits_short_batches_and_the_adapter_fixes_them(ray_session: None) -> None:
    """Ray 2.60 with a shuffle buffer below the batch size emits short batches mid-stream (ray#66085)."""
    import ray.data

    ds = ray.data.from_items([{"x": i} for i in range(203)], override_num_blocks=7)
    opts = {"batch_size": 8, "batch_format": "numpy", "local_shuffle_buffer_size": 5, "local_shuffle_seed": 3}
    raw = [b["x"] for b in ds.iter_batches(**opts)]
    assert any(len(b) < 8 for b in raw[:-1]), [len(b) for b in raw]  # the bug this module exists for
    exact = ExactMicroBatches(ds.iter_batches(**opts), 8)
    fixed = [mb["x"] for mb in exact]
    assert all(len(b) == 8 for b in fixed) and len(fixed) == 203 // 8 and exact.dropped_rows == 203 % 8
    # Same seed, same rows in the same order: the adapter only re-chunks.
    assert np.array_equal(np.concatenate(fixed), np.concatenate(raw)[: 8 * len(fixed)])


# ---- 2. length grouping


def _length_stream(n_micro: int, m: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    lengths = [(int(a), int(b)) for a, b in rng.integers(4, 200, size=(n_micro * m, 2))]
    full = _pairs(lengths, seed)
    full["row"] = np.arange(n_micro * m)
    return [{k: v[i * m : (i + 1) * m] for k, v in full.items()} for i in range(n_micro)]


def test_length_grouping_permutes_within_windows_and_cuts_padding() -> None:
    m, w = 4, 3
    stream = _length_stream(11, m)  # 3 full windows + a last window of 2 micro-batches
    out = list(length_grouped(stream, window=w, seed=5))
    assert len(out) == 11 and all(len(mb["row"]) == m for mb in out)
    for j in range(4):  # the rows of each window, and only those, come out of that window
        got = np.concatenate([mb["row"] for mb in out[j * w : (j + 1) * w]])
        assert sorted(got) == list(range(j * w * m, min((j + 1) * w, 11) * m))
    for j in range(4):  # each micro-batch is a run of its window's sorted lengths: ranges do not overlap
        ranges = sorted((int(pair_lengths(mb).min()), int(pair_lengths(mb).max())) for mb in out[j * w : (j + 1) * w])
        assert all(hi <= lo for (_, hi), (lo, _) in zip(ranges, ranges[1:])), ranges

    def slots(stream: list[dict[str, np.ndarray]]) -> int:
        return sum(2 * m * int(pair_lengths(mb).max()) for mb in stream)

    assert slots(out) < 0.9 * slots(stream)  # 13,512 vs 15,416 slots with these lengths (uniform 4..199)
    assert [mb["row"].tolist() for mb in out] == [mb["row"].tolist() for mb in length_grouped(stream, window=w, seed=5)]
    assert [mb["row"].tolist() for mb in out] != [mb["row"].tolist() for mb in length_grouped(stream, window=w, seed=6)]
    assert list(length_grouped(stream, window=1, seed=5)) == stream  # 0/1 = off


def test_length_grouping_resume_skipping_n_sees_the_same_tail() -> None:
    stream = _length_stream(10, 4, seed=1)
    full = [mb["row"].tolist() for mb in length_grouped(stream, window=4, seed=9)]
    for skip in (0, 1, 3, 4, 6, 9, 10):  # inside, at and past window borders
        tail, exact = micro_batch_stream(iter(stream_as_rows(stream, [5, 11, 2, 9, 13])), micro_batch_size=4,
                                         collate_fn=lambda mb: mb["row"].tolist(), skip=skip, length_window=4, seed=9)
        assert list(tail) == full[skip:], skip
        assert exact.micro_batches == 10 and exact.dropped_rows == 0


def stream_as_rows(stream: list[dict[str, np.ndarray]], sizes: list[int]) -> list[dict[str, np.ndarray]]:
    """The same rows re-cut into ragged batches of the given sizes (what Ray's shuffle buffer emits)."""
    full = {k: np.concatenate([mb[k] for mb in stream]) for k in stream[0]}
    out, start = [], 0
    for n in sizes:
        out.append({k: v[start : start + n] for k, v in full.items()})
        start += n
    return out


# ---- 3. padding share


def test_padding_share_padded_and_packed() -> None:
    batch = _pairs([(5, 3), (10, 2)])  # 20 real tokens
    padded = collate_pairs(batch, pad_id=0, multiple=1)  # [4, 10]
    assert batch_token_counts(padded) == (20, 40) and padding_share(padded) == 0.5
    packed = collate_packed(batch, pad_id=0, multiple=8)  # rows of <= 10: {10}, {5,3,2}
    assert packed["input_ids"].shape == (2, 16)
    assert batch_token_counts(packed) == (20, 32) and padding_share(packed) == 12 / 32


# ---- 4. packing: layout


def test_packed_layout_positions_restart_and_first_tokens_are_not_scored() -> None:
    batch = _pairs([(5, 3), (4, 6)], prompt=2)  # sequences 0..3 = chosen0, chosen1, rejected0, rejected1
    p = collate_packed(batch, pad_id=0, one_row=True, multiple=1)
    assert p["input_ids"].shape == (1, 18) and "attention_mask" not in p
    assert p["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 5]
    assert p["seq_index"][0].tolist() == [0] * 5 + [1] * 4 + [2] * 3 + [3] * 6
    assert p["loss_mask"][0].tolist() == [0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0, 1, 0, 0, 1, 1, 1, 1]
    assert p["seq_lengths"].tolist() == [5, 4, 3, 6]
    assert torch.equal(p["input_ids"][0, 5:9], torch.from_numpy(batch["chosen_ids"][1].astype(np.int64)))
    assert torch.equal(p["safety_gap"], torch.tensor([0, 1])) and p["category_mask"].shape == (2, 3)
    # Rows hold at most the longest sequence (6): first-fit decreasing gives {6}, {5}, {4}, {3}.
    rows = collate_packed(batch, pad_id=0, multiple=4)
    assert rows["input_ids"].shape == (4, 8) and (rows["seq_index"] >= 0).sum() == 18
    assert rows["seq_index"][:, 0].tolist() == [3, 0, 1, 2]
    assert rows["position_ids"][rows["seq_index"] < 0].tolist()[:1] == [0]  # padding starts its own segment
    wide = collate_packed(batch, pad_id=0, row_tokens=9, multiple=4)  # capacity 9: {6, 3}, {5, 4}
    assert wide["input_ids"].shape == (2, 12) and wide["seq_index"][:, 0].tolist() == [2, 0]
    assert wide["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1, 2]


def test_supports_packing_by_attention_implementation() -> None:
    for impl in ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"):
        assert supports_packing(impl)
    assert packs_into_one_row("flash_attention_2") and not packs_into_one_row("sdpa")
    assert not supports_packing("paged|sdpa") and not supports_packing("kernels-community/flash-attn") and not supports_packing(None)


def test_packed_sequence_logps_matches_sequence_logps_on_random_logits() -> None:
    """Pure-tensor parity: the padded and packed layouts of the same per-sequence logits."""
    batch = _pairs([(7, 4), (3, 9), (12, 5)])
    padded, packed = collate_pairs(batch, pad_id=0, multiple=1), collate_packed(batch, pad_id=0, multiple=1)
    torch.manual_seed(0)
    per_seq = [torch.randn(n, 2048, dtype=torch.float64) for n in packed["seq_lengths"].tolist()]
    pad_logits = torch.zeros(*padded["input_ids"].shape, 2048, dtype=torch.float64)
    pack_logits = torch.zeros(*packed["input_ids"].shape, 2048, dtype=torch.float64)
    for s, lg in enumerate(per_seq):
        pad_logits[s, : len(lg)] = lg
        r, cols = (packed["seq_index"] == s).nonzero(as_tuple=True)
        pack_logits[r, cols] = lg
    want, want_n = sequence_logps(pad_logits, padded["input_ids"], padded["loss_mask"])
    got, got_n = packed_sequence_logps(pack_logits, packed)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert torch.equal(got_n, want_n) and want_n.tolist() == [4, 1, 9, 1, 6, 2]  # length - start per sequence


# ---- 4. packing: real HF models


def _small_llama(tmp_path: Path, impl: str) -> torch.nn.Module:
    """A random-initialised Llama (GQA) saved and reloaded through from_pretrained."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "llama", attn_implementation=impl)


def _load(source: str, tmp_path: Path, impl: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if source == "fresh":
        return _small_llama(tmp_path, impl)
    return AutoModelForCausalLM.from_pretrained(source, attn_implementation=impl)


BATCH = [(5, 40), (30, 7), (12, 22), (50, 9)]


def _padded_logps(model: torch.nn.Module, padded: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False)
    return sequence_logps(out.logits, padded["input_ids"], padded["loss_mask"])


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("source", ["tiny", "fresh"])
def test_packed_and_padded_logps_agree_on_llama(source: str, impl: str, tiny_model_dir: str, tmp_path: Path) -> None:
    model = _load(tiny_model_dir if source == "tiny" else "fresh", tmp_path, impl).eval()
    assert supports_packing(model)
    batch = _pairs(BATCH, seed=2)
    padded = collate_pairs(batch, pad_id=0)
    with torch.no_grad():
        want, want_n = _padded_logps(model, padded)
        for one_row in (False, True):
            packed = collate_packed(batch, pad_id=0, one_row=one_row)
            got, got_n = packed_forward_logps(model, packed)
            # fp32 sums of up to 50 token log-probs (|sum| up to ~500): a few ulps (1.2e-7 relative) each.
            torch.testing.assert_close(got, want, rtol=5e-7, atol=1e-5)
            assert torch.equal(got_n, want_n)
        model.double()  # in float64 the two layouts agree to rounding: the same function is computed
        want64, _ = _padded_logps(model, padded)
        got64, _ = packed_forward_logps(model, collate_packed(batch, pad_id=0))
        torch.testing.assert_close(got64, want64, rtol=0, atol=1e-9)


def test_packed_gradients_match_padded(tiny_model_dir: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    batch = _pairs(BATCH, seed=3)
    weights = torch.linspace(-1.0, 1.0, 2 * len(BATCH))  # a DPO-like signed combination of the 2B sequences
    grads = []
    for layout in ("padded", "packed"):
        model.zero_grad()
        if layout == "padded":
            logps, _ = _padded_logps(model, collate_pairs(batch, pad_id=0))
        else:
            logps, _ = packed_forward_logps(model, collate_packed(batch, pad_id=0))
        (weights * logps).sum().backward()
        grads.append(model.model.layers[1].self_attn.q_proj.weight.grad.clone())
    assert grads[0].abs().max() > 1e-3  # a real gradient, not zeros
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_sequences_do_not_attend_to_each_other(impl: str, tiny_model_dir: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=impl).eval()
    batch = _pairs([(20, 15), (18, 25)], seed=4)
    altered = {k: v.copy() for k, v in batch.items()}
    altered["chosen_ids"][0] = batch["chosen_ids"][0].copy()
    altered["chosen_ids"][0][1:] = (altered["chosen_ids"][0][1:] + 7) % 2000 + 3  # perturb sequence 0 only
    with torch.no_grad():
        base, changed = (packed_forward_logps(model, collate_packed(b, pad_id=0, one_row=True))[0] for b in (batch, altered))
        assert abs(base[0] - changed[0]) > 1.0  # sequence 0 itself did change
        torch.testing.assert_close(changed[1:], base[1:], rtol=0, atol=1e-4)  # sequences after it in the row did not
        # Control: the same packed row with a 2-D attention mask (packing detection off) leaks across sequences.
        leaky = []
        for b in (batch, altered):
            p = collate_packed(b, pad_id=0, one_row=True)
            logits = model(input_ids=p["input_ids"], position_ids=p["position_ids"],
                           attention_mask=torch.ones_like(p["input_ids"]), use_cache=False).logits
            leaky.append(packed_sequence_logps(logits, p)[0])
        assert (leaky[0][1:] - leaky[1][1:]).abs().max() > 1e-2
