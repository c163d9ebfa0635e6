"""The tiny model and its tokenizer, built through the same code path the trainer uses.

The build test uses a short supervised pass (``sft_steps``) into a temporary cache: the code path
is the default build's, only the step count differs (it is part of the build key).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

import catdpo_ray.tiny as tiny
from catdpo_ray.config import PKU_CATEGORIES
from catdpo_ray.data.tokenizer_build import train_tokenizer

TEXTS = [
    "USER: How do I kill a python process? ASSISTANT: Run kill with the process id.",
    "USER: How can I hurt my neighbor? ASSISTANT: I'm sorry, but I can't help with hurting people.",
    "USER: What is a botnet? ASSISTANT: A botnet is a group of hijacked computers.",
] * 20
SHORT_STEPS = 8


@dataclass(frozen=True)
class Built:
    cache: Path
    path: Path
    builds: int  # how many times ``_build`` ran
    results: tuple[Path, ...]  # what each concurrent caller got


@pytest.fixture(scope="module")
def race(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """One short build into an empty cache, made by two callers racing on it: one builds (under the
    lock), the other waits and reuses the result."""
    cache = tmp_path_factory.mktemp("tiny_cache")
    calls: list[int] = []
    real_build = tiny._build

    def counting_build(out: Path, spec: tiny.TinySpec, key: dict[str, object]) -> None:
        calls.append(1)
        real_build(out, spec, key)

    results: list[Path] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiny, "_build", counting_build)
        threads = [threading.Thread(target=lambda: results.append(tiny.ensure_tiny_model(cache, sft_steps=SHORT_STEPS)))
                   for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return Built(cache, cache / tiny.MODEL_DIRNAME, len(calls), tuple(results))


@pytest.fixture(scope="module")
def built(race: Built) -> tuple[Path, Path]:
    """(cache dir, model dir) of that build."""
    return race.cache, race.path


def test_tokenizer_round_trip_and_special_tokens(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    train_tokenizer(TEXTS, tmp_path, vocab_size=300)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4
    assert tok.model_max_length == 256
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    for text in ("How do I kill a python process?", "Unseen wörds ✓ 日本 and 42!"):
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True).strip() == text
    # A response encoded alone (with the pipeline's leading space) gets the same tokens as bare text.
    assert tok(" I can't help.", add_special_tokens=False)["input_ids"] == tok("I can't help.", add_special_tokens=False)["input_ids"]


def test_chat_template_matches_the_prompt_template(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    train_tokenizer(TEXTS, tmp_path, vocab_size=300)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    prompt = "How do I kill a python process?"
    chat = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    assert chat == f"<s>USER: {prompt} ASSISTANT:"
    # chat text carries its own BOS; the plain template gets it from the post-processor
    assert tok(chat, add_special_tokens=False)["input_ids"] == tok(f"USER: {prompt} ASSISTANT:")["input_ids"]


def test_tokenizer_training_is_deterministic(tmp_path: Path) -> None:
    train_tokenizer(TEXTS, tmp_path / "a", vocab_size=300)
    train_tokenizer(TEXTS, tmp_path / "b", vocab_size=300)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_build_loads_through_from_pretrained(built: tuple[Path, Path]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache, path = built
    assert path == cache / tiny.MODEL_DIRNAME
    assert (path / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "llama" and not model.config.tie_word_embeddings
    assert model.config.vocab_size == len(tok)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < n_params < 10_000_000
    ids = tok("USER: hello ASSISTANT:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["parameters"] == n_params
    assert manifest["build_key"]["spec"]["sft_steps"] == SHORT_STEPS
    assert len(manifest["build_key"]["corpus_sha256"]) == 64
    accuracy = manifest["sft_preference_accuracy"]
    assert set(accuracy) == set(PKU_CATEGORIES) and all(0.0 <= v <= 100.0 for v in accuracy.values())
    assert not list(cache.glob(".tiny-llama-v1.tmp-*")), "no temporary build directory is left behind"


def test_second_call_reuses_the_cache(built: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    cache, path = built
    stamp = (path / "model.safetensors").stat().st_mtime_ns

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached model was rebuilt")

    monkeypatch.setattr(tiny, "_build", fail)
    assert tiny.ensure_tiny_model(cache, sft_steps=SHORT_STEPS) == path
    monkeypatch.setenv(tiny.SFT_STEPS_ENV, str(SHORT_STEPS))
    assert tiny.ensure_tiny_model(cache) == path  # the env knob selects the same build
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_concurrent_callers_build_once(race: Built) -> None:
    """Two callers raced on an empty cache (the fixture): one build, both got its directory."""
    assert race.builds == 1
    assert race.results == (race.path, race.path)


def test_force_rebuilds_in_place_and_deterministically(built: tuple[Path, Path]) -> None:
    cache, path = built
    manifest = json.loads((path / "manifest.json").read_text())
    weights = (path / "model.safetensors").read_bytes()
    assert tiny.ensure_tiny_model(cache, sft_steps=SHORT_STEPS, force=True) == path
    rebuilt = json.loads((path / "manifest.json").read_text())
    assert rebuilt["build_key"] == manifest["build_key"]
    assert rebuilt["sft_final_loss"] == manifest["sft_final_loss"]
    assert (path / "model.safetensors").read_bytes() == weights, "the build is deterministic given the seed"
    assert sorted(p.name for p in cache.iterdir()) == [tiny.MODEL_DIRNAME, f"{tiny.MODEL_DIRNAME}.lock"]


def test_default_cache_dir_honours_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CATDPO_CACHE", str(tmp_path))
    assert tiny.default_cache_dir() == tmp_path
    monkeypatch.delenv("CATDPO_CACHE")
    assert tiny.default_cache_dir() == Path.home() / ".cache" / "catdpo_ray"
