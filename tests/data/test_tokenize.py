"""Tokenization stage and the padding collate on the tiny model's tokenizer."""

from __future__ import annotations

import numpy as np
import torch

from catdpo_ray.data.tokenize import PairTokenizer, collate_pairs


def _batch(prompts: list[str], chosen: list[str], rejected: list[str]) -> dict[str, np.ndarray]:
    n = len(prompts)
    return {
        "prompt": np.array(prompts, dtype=object),
        "chosen": np.array(chosen, dtype=object),
        "rejected": np.array(rejected, dtype=object),
        "safety_gap": np.array([1] * n),
        "categories": np.array([[1, 0, 0]] * n),
        "chosen_safe": np.array([True] * n),
        "rejected_safe": np.array([False] * n),
    }


def test_tokenize_then_collate_masks_only_response_tokens(tiny_model_dir: str) -> None:
    tok = PairTokenizer(tiny_model_dir, prompt_template="USER: {prompt} ASSISTANT:", use_chat_template=False,
                        max_length=64, max_prompt_length=32)
    out = tok(_batch(["how do I bake bread", "tell me"], ["mix flour and water", "ok"], ["no", "I refuse to help"]))
    t = tok.tokenizer
    for i in range(2):
        ids, start = list(out["chosen_ids"][i]), int(out["chosen_start"][i])
        assert ids[0] == t.bos_token_id and ids[-1] == t.eos_token_id
        assert t.decode(ids[1:start]).strip() == ["USER: how do I bake bread ASSISTANT:", "USER: tell me ASSISTANT:"][i]
        assert list(out["rejected_ids"][i][:start]) == ids[:start]  # same prompt tokens
    assert out["truncated"].tolist() == [0, 0]
    batch = collate_pairs(out, pad_id=t.pad_token_id)
    b, length = 2, batch["input_ids"].shape[1]
    assert batch["input_ids"].shape == (2 * b, length) and length % 8 == 0
    for row, (ids, start) in enumerate(zip(list(out["chosen_ids"]) + list(out["rejected_ids"]),
                                           list(out["chosen_start"]) + list(out["rejected_start"]))):
        mask = batch["loss_mask"][row]
        assert mask[:start].sum() == 0
        assert mask[start : len(ids)].sum() == len(ids) - start
        assert mask[len(ids):].sum() == 0
        assert batch["attention_mask"][row].sum() == len(ids)
    assert batch["category_mask"].dtype == torch.bool and batch["category_mask"].shape == (2, 3)


def test_truncation_is_counted(tiny_model_dir: str) -> None:
    tok = PairTokenizer(tiny_model_dir, prompt_template="USER: {prompt} ASSISTANT:", use_chat_template=False,
                        max_length=24, max_prompt_length=8)
    long = " ".join(["word"] * 40)
    out = tok(_batch([long, "hi"], [long, "a"], ["b", "c"]))
    assert out["truncated"].tolist() == [1, 0]
    assert len(out["chosen_ids"][0]) == 24 and out["chosen_start"][0] == 8


def test_response_only_sequences_for_bdpo(tiny_model_dir: str) -> None:
    tok = PairTokenizer(tiny_model_dir, prompt_template="USER: {prompt} ASSISTANT:", use_chat_template=False,
                        max_length=64, max_prompt_length=32)
    out = tok(_batch(["q"], ["an answer"], ["other"]))
    t = tok.tokenizer
    batch = collate_pairs(out, pad_id=t.pad_token_id, bos_id=t.bos_token_id, with_response_only=True)
    start = int(out["chosen_start"][0])
    resp = list(out["chosen_ids"][0][start:])
    assert batch["resp_input_ids"][0, : len(resp) + 1].tolist() == [t.bos_token_id, *resp]
    assert batch["resp_loss_mask"][0].sum() == len(resp) and batch["resp_loss_mask"][0, 0] == 0
