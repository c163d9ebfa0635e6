"""Config: YAML + dotted overrides, load-time errors that name the key and the choices."""

from __future__ import annotations

from pathlib import Path

import pytest

from catdpo_ray.config import ConfigError, RunConfig, config_reference, from_dict, load_config, to_yaml


def test_defaults_and_overrides() -> None:
    cfg = load_config(None, ["loss.beta=0.2", "dual.eta=0.25", "dual.epsilon=[0.1, 0.2, 0.3]", "data.categories=[a, b, c]"])
    assert cfg.loss.beta == 0.2 and cfg.dual.eta == 0.25
    assert cfg.per_category(cfg.dual.epsilon) == [0.1, 0.2, 0.3]
    assert cfg.per_category(cfg.dual.lambda_init) == [0.0, 0.0, 0.0]
    assert isinstance(cfg.loss.beta, float)
    # PyYAML reads 1e-6 (no dot) as a string; float fields accept it, string fields keep it
    assert load_config(None, ["train.lr=1e-6"]).train.lr == 1e-6
    assert load_config(None, ["dual.epsilon=[1e-2, 2e-2, 3e-2]", "data.categories=[a, b, c]"]).dual.epsilon == [0.01, 0.02, 0.03]
    d = load_config()
    assert d.loss.name == "catdpo" and d.pair_mode == "safety_aware" and d.num_categories == 19


def test_yaml_file_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("loss:\n  name: safedpo\n  delta: 5\ntrain:\n  micro_batch_size: 4\n  grad_accum: 3\n")
    cfg = load_config(f, ["scaling.num_workers=4"])
    assert cfg.loss.name == "safedpo" and cfg.loss.delta == 5.0
    assert cfg.global_batch_size == 4 * 3 * 4
    # round trip: the resolved config.yaml of a run loads back to the same config
    again = tmp_path / "again.yaml"
    again.write_text(to_yaml(cfg))
    assert load_config(again) == cfg


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("loss.bta=0.2", "unknown config key 'loss.bta'"),
        ("los.beta=0.2", "unknown config section 'los'"),
        ("loss.name=orpo", "'orpo' is not valid; choose one of ['dpo', 'ipo', 'simpo', 'safedpo', 'catdpo', 'bdpo']"),
        ("train.micro_batch_size=two", "train.micro_batch_size: expected an integer"),
        ("train.micro_batch_size=2.5", "train.micro_batch_size: expected an integer"),
        ("dual.eta=fast", "dual.eta"),
        ("logging.tensorboard=3", "logging.tensorboard: expected true/false"),
        ("dual.agg=min", "choose one of ['sum', 'mean', 'max', 'binding']"),
        ("train.zero_stage=4", "train.zero_stage: 4 is not valid"),
        ("dual.epsilon=[0.1, 0.2]", "dual.epsilon: a list must have one value per category (19"),
        ("dual.lambda_init=200", "outside [0, dual.lambda_max=100.0]"),
        ("data.pairs=helpful", "data.pairs='helpful' with loss.name='catdpo'"),
        ("train.offload_param=true", "train.offload_param needs train.zero_stage=3"),
        ("eval.judges=[rule, vibes]", "unknown judge 'vibes'"),
        ("eval.judges=[llm]", "eval.llm_base_url is not set"),
        ("data.max_prompt_length=500", "max_prompt_length must be smaller"),
        ("badformat", "not of the form section.key=value"),
    ],
)
def test_errors_name_key_and_choices(override: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert words in str(info.value)


def test_unknown_key_in_yaml_names_it(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  learning_rate: 1e-5\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.learning_rate'; valid keys here: \[.*'lr'"):
        load_config(f)


def test_frozen_and_replace() -> None:
    cfg = from_dict({})
    with pytest.raises(AttributeError):
        cfg.loss.beta = 1.0  # type: ignore[misc]
    new = cfg.replace({"dual.eta": 2.0})
    assert new.dual.eta == 2.0 and cfg.dual.eta == 0.5
    assert isinstance(new, RunConfig)


def test_pair_mode_auto_per_loss() -> None:
    assert load_config(None, ["loss.name=dpo"]).pair_mode == "safe_better"
    assert load_config(None, ["loss.name=dpo", "data.pairs=helpful"]).pair_mode == "helpful"
    assert load_config(None, ["loss.name=safedpo"]).pair_mode == "safety_aware"


def test_reference_lists_every_key() -> None:
    ref = config_reference()
    for key in ("`dual.eta`", "`loss.name`", "`model.lora.r`", "`scaling.num_workers`", "`tune.objective`"):
        assert key in ref


def test_negative_seed_is_rejected() -> None:
    with pytest.raises(ConfigError, match="train.seed"):
        load_config(None, ["train.seed=-1"])
