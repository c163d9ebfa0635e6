"""Config: YAML + dotted overrides, load-time errors that name the key and the choices."""

from __future__ import annotations

from pathlib import Path

import pytest

from catdpo_ray.config import ConfigError, RunConfig, from_dict, load_config, to_yaml
from catdpo_ray.config_docs import config_reference


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


# ---------------------------------------------------------------------------------------------
# Range validation at load time (issue 11, item 8): every numeric key, exact messages.

#: override(s) -> the exact ConfigError message. One row per key of RANGES at least (checked below),
#: with the value just outside the range; ints stay ints in the message, floats are shown coerced.
BAD_VALUES: list[tuple[list[str], str]] = [
    (["model.lora.r=0"], "model.lora.r: must be >= 1, got 0"),
    (["model.lora.alpha=0"], "model.lora.alpha: must be >= 1, got 0"),
    (["model.lora.dropout=1"], "model.lora.dropout: must be in [0, 1), got 1.0"),
    (["data.max_prompt_length=1", "data.max_length=1"],
     "data.max_length: must be >= 2 (it must exceed data.max_prompt_length >= 1), got 1"),
    (["data.max_prompt_length=0"], "data.max_prompt_length: must be >= 1, got 0"),
    (["data.max_train_rows=0"], "data.max_train_rows: must be >= 1 or null, got 0"),
    (["data.max_test_rows=-5"], "data.max_test_rows: must be >= 1 or null, got -5"),
    (["loss.beta=0"], "loss.beta: must be > 0, got 0.0"),
    (["loss.label_smoothing=0.5"],
     "loss.label_smoothing: must be in [0, 0.5) (at 0.5 the conservative DPO loss ignores the labels), got 0.5"),
    (["loss.label_smoothing=-0.1"],
     "loss.label_smoothing: must be in [0, 0.5) (at 0.5 the conservative DPO loss ignores the labels), got -0.1"),
    (["loss.delta=-1"], "loss.delta: must be >= 0, got -1.0"),
    (["loss.simpo_gamma=-0.5"], "loss.simpo_gamma: must be >= 0, got -0.5"),
    (["loss.bdpo_tau=0"], "loss.bdpo_tau: must be > 0, got 0.0"),
    (["dual.eta=-0.1"], "dual.eta: must be >= 0, got -0.1"),
    (["dual.epsilon=-0.01"], "dual.epsilon: must be in [0, 1] (a violation rate), got -0.01"),
    (["dual.epsilon=1.5"], "dual.epsilon: must be in [0, 1] (a violation rate), got 1.5"),
    (["data.categories=[a, b, c]", "dual.epsilon=[0.1, -0.2, 0.3]"],
     "dual.epsilon[1]: must be in [0, 1] (a violation rate), got -0.2"),
    (["dual.lambda_max=0"], "dual.lambda_max: must be > 0, got 0.0"),
    (["dual.update_every=0"], "dual.update_every: must be >= 1, got 0"),
    (["dual.check_every=0"], "dual.check_every: must be >= 1, got 0"),
    (["dual.generation_every=0"], "dual.generation_every: must be >= 1, got 0"),
    (["dual.generation_prompts_per_category=0"], "dual.generation_prompts_per_category: must be >= 1, got 0"),
    (["dual.generation_pool_per_category=0"], "dual.generation_pool_per_category: must be >= 1, got 0"),
    (["dual.generation_max_new_tokens=0"], "dual.generation_max_new_tokens: must be >= 1, got 0"),
    (["dual.generation_temperature=-0.1"], "dual.generation_temperature: must be >= 0, got -0.1"),
    (["dual.generation_batch_size=0"], "dual.generation_batch_size: must be >= 1, got 0"),
    (["dual.blend_weight=1.5"], "dual.blend_weight: must be in [0, 1], got 1.5"),
    (["data.categories=[a, b, c]", "dual.epsilon=[0.1, 0.2]"],
     "dual.epsilon: a list must have one value per category (3 in data.categories), got 2"),
    (["data.categories=[a, b, c]", "dual.lambda_init=[0, 1, 2, 3]"],
     "dual.lambda_init: a list must have one value per category (3 in data.categories), got 4"),
    (["dual.lambda_init=-1"], "dual.lambda_init: -1.0 is outside [0, dual.lambda_max=100.0]"),
    (["data.categories=[a, b, c]", "dual.lambda_init=[0, 5, 200]"],
     "dual.lambda_init[2]: 200.0 is outside [0, dual.lambda_max=100.0]"),
    (["train.seed=-1"], "train.seed: must be >= 0 (numpy and Ray Data shuffles take non-negative seeds), got -1"),
    (["train.shuffle_buffer=0"], "train.shuffle_buffer: must be >= 1, got 0"),
    (["train.length_grouping=-1"], "train.length_grouping: must be >= 0 (0 = off), got -1"),
    (["train.epochs=0"], "train.epochs: must be >= 1, got 0"),
    (["train.max_steps=0"], "train.max_steps: must be >= 1 or null, got 0"),
    (["train.max_steps=-3"], "train.max_steps: must be >= 1 or null, got -3"),
    (["train.micro_batch_size=0"], "train.micro_batch_size: must be >= 1, got 0"),
    (["train.grad_accum=0"], "train.grad_accum: must be >= 1, got 0"),
    (["train.lr=-1e-5"], "train.lr: must be >= 0, got -1e-05"),
    (["train.lr=.nan"], "train.lr: must be a finite number >= 0, got nan"),
    (["train.lr=.inf"], "train.lr: must be a finite number >= 0, got inf"),
    (["train.weight_decay=-0.01"], "train.weight_decay: must be >= 0, got -0.01"),
    (["train.warmup_ratio=1.5"], "train.warmup_ratio: must be in [0, 1], got 1.5"),
    (["train.min_lr_ratio=-0.1"], "train.min_lr_ratio: must be in [0, 1], got -0.1"),
    (["train.grad_clip=-1"], "train.grad_clip: must be >= 0 (0 = no clipping), got -1.0"),
    (["train.log_every=0"], "train.log_every: must be >= 1, got 0"),
    (["train.eval_every=-1"], "train.eval_every: must be >= 0 (0 = only at the end), got -1"),
    (["train.checkpoint_every=-1"], "train.checkpoint_every: must be >= 0 (0 = only at the end), got -1"),
    (["train.stop_after_step=0"], "train.stop_after_step: must be >= 1 or null, got 0"),
    (["scaling.num_workers=-1"], "scaling.num_workers: must be >= 0 (0 = Ray Train local mode), got -1"),
    (["scaling.cpus_per_worker=0"], "scaling.cpus_per_worker: must be > 0, got 0.0"),
    (["output.num_checkpoints_to_keep=0"], "output.num_checkpoints_to_keep: must be >= 1, got 0"),
    (["output.max_failures=-2"],
     "output.max_failures: must be >= -1 (-1 = retry without limit, as in Ray's FailureConfig), got -2"),
    (["eval.max_new_tokens=0"], "eval.max_new_tokens: must be >= 1, got 0"),
    (["eval.temperature=-0.1"], "eval.temperature: must be >= 0 (0 = greedy decoding), got -0.1"),
    (["eval.top_p=0"], "eval.top_p: must be in (0, 1], got 0.0"),
    (["eval.top_p=1.1"], "eval.top_p: must be in (0, 1], got 1.1"),
    (["eval.batch_size=0"], "eval.batch_size: must be >= 1, got 0"),
    (["eval.max_prompts_per_category=0"], "eval.max_prompts_per_category: must be >= 1, got 0"),
    (["eval.llm_timeout_s=0"], "eval.llm_timeout_s: must be > 0, got 0.0"),
    (["eval.num_actors=-1"], "eval.num_actors: must be >= 0 (0 = max(1, scaling.num_workers)), got -1"),
    (["eval.num_gpus_per_actor=-0.5"], "eval.num_gpus_per_actor: must be >= 0 or null (fractions share a GPU), got -0.5"),
    (["tune.eta=[0.5, -1]"], "tune.eta[1]: must be >= 0, got -1.0"),
    (["tune.epsilon=[0.02, 2]"], "tune.epsilon[1]: must be in [0, 1] (a violation rate), got 2.0"),
    (["tune.num_samples=0"], "tune.num_samples: must be >= 1, got 0"),
    (["tune.asha_grace_period=0"], "tune.asha_grace_period: must be >= 1, got 0"),
    (["tune.helpfulness_floor=101"], "tune.helpfulness_floor: must be in [0, 100] (a percentage), got 101.0"),
    (["tune.max_concurrent=-1"], "tune.max_concurrent: must be >= 0 (0 = derive from the cluster), got -1"),
    (["data.max_prompt_length=128"],
     "data.max_prompt_length must be smaller than data.max_length (got 128 >= 128): a response needs at least one token"),
    (["scaling.data_cpus=1"],
     "config key 'scaling.data_cpus' was removed: it was never read (Ray Data sizes its own CPU use); delete it"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_value_is_refused_at_load_with_exact_message(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert str(info.value) == message


def test_bad_value_in_yaml_file_gets_the_same_message(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert str(info.value) == "train.epochs: must be >= 1, got 0"
    # an old run's config.yaml still holding the removed key is refused with the removal message
    f.write_text("scaling:\n  num_workers: 1\n  data_cpus: 0.0\n")
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert str(info.value).startswith("config key 'scaling.data_cpus' was removed")


def test_values_on_the_boundaries_are_accepted() -> None:
    """Each bound is inclusive or exclusive as documented: the edge values that are valid load."""
    cfg = load_config(None, [
        "train.lr=0", "output.max_failures=-1", "scaling.num_workers=0", "train.warmup_ratio=1",
        "train.min_lr_ratio=0", "eval.top_p=1", "eval.temperature=0", "loss.label_smoothing=0.49",
        "train.max_steps=1", "train.checkpoint_every=0", "train.eval_every=0", "train.grad_clip=0",
        "dual.eta=0", "dual.lambda_init=100", "data.max_prompt_length=127", "tune.max_concurrent=0",
        "data.categories=[a, b]", "dual.epsilon=[0, 1]", "tune.helpfulness_floor=100",
    ])
    assert (cfg.train.lr, cfg.output.max_failures, cfg.scaling.num_workers) == (0.0, -1, 0)
    assert cfg.dual.epsilon == [0.0, 1.0] and cfg.per_category(cfg.dual.lambda_init) == [100.0, 100.0]
    assert load_config(None, ["train.max_steps=null"]).train.max_steps is None


def _numeric_keys() -> list[str]:
    """Every config key whose annotation holds int or float (bool excluded), in dotted form."""
    import dataclasses
    import types
    from typing import Union, get_args, get_origin, get_type_hints

    def numeric(tp: object) -> bool:
        if tp in (int, float):
            return True
        if get_origin(tp) in (Union, types.UnionType, list):
            return any(numeric(a) for a in get_args(tp))
        return False

    keys: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, prefix + f.name + ".")  # type: ignore[arg-type]
            elif numeric(tp):
                keys.append(prefix + f.name)

    walk(RunConfig, "")
    return keys


def test_every_numeric_key_has_a_range_and_a_bad_value_test() -> None:
    """A new numeric key must get a range in RANGES (or be declared unbounded) and a row in BAD_VALUES."""
    from catdpo_ray.config_ranges import RANGES, UNBOUNDED_KEYS

    # dual.lambda_init's range depends on dual.lambda_max: checked across fields in validate()
    cross_checked = {"dual.lambda_init"}
    missing = [k for k in _numeric_keys() if k not in RANGES and k not in UNBOUNDED_KEYS and k not in cross_checked]
    assert missing == [], f"numeric keys without a range: {missing}"
    tested = {o.split("=")[0] for overrides, _ in BAD_VALUES for o in overrides[-1:]}
    assert sorted(set(RANGES) - tested) == []


def test_cli_refuses_a_bad_value_before_creating_anything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`catdpo-ray train train.epochs=0` exits 2 with the message; no run directory exists (so no
    Ray start, no tokenization: run_training has not been entered)."""
    from catdpo_ray.cli import main

    out = tmp_path / "runs"
    assert main(["train", "train.epochs=0", f"output.dir={out}"]) == 2
    assert capsys.readouterr().err.strip() == "config error: train.epochs: must be >= 1, got 0"
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# check_paths: model and data locations, on the driver before Ray starts (no network).


def test_check_paths_accepts_tiny_a_model_dir_and_a_hub_id(tiny_model_dir: str) -> None:
    from catdpo_ray.config_locations import check_paths

    check_paths(load_config())
    check_paths(load_config(None, [f"model.name_or_path={tiny_model_dir}", f"model.tokenizer={tiny_model_dir}"]))
    check_paths(load_config(None, ["model.name_or_path=meta-llama/Llama-2-7b-hf"]))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("/nonexistent/model", "model.name_or_path '/nonexistent/model': no such directory, and not a hub id of the form owner/name"),
        ("./models/llama/7b", "model.name_or_path './models/llama/7b': no such directory, and not a hub id of the form owner/name"),
        ("gpt2", "model.name_or_path 'gpt2': no such directory, and not a hub id of the form owner/name"),
        ("owner/bad--name", "model.name_or_path 'owner/bad--name': no such directory, and not a hub id of the form owner/name"),
    ],
)
def test_check_paths_refuses_a_model_that_is_neither_dir_nor_hub_id(value: str, message: str) -> None:
    from catdpo_ray.config_locations import check_paths

    with pytest.raises(ConfigError) as info:
        check_paths(load_config(None, [f"model.name_or_path={value}"]))
    assert str(info.value) == message


def test_check_paths_refuses_dir_without_config_json_and_a_file(tmp_path: Path) -> None:
    from catdpo_ray.config_locations import check_paths

    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError) as info:
        check_paths(load_config(None, [f"model.name_or_path={tmp_path / 'weights'}"]))
    assert str(info.value) == (f"model.name_or_path '{tmp_path / 'weights'}': the directory has no config.json, "
                               "so it is not a Hugging Face model directory")
    with pytest.raises(ConfigError) as info:
        check_paths(load_config(None, [f"model.name_or_path={tmp_path / 'weights' / 'model.safetensors'}"]))
    assert str(info.value) == (f"model.name_or_path '{tmp_path / 'weights' / 'model.safetensors'}': "
                               "is a file, not a model directory or a hub id")
    with pytest.raises(ConfigError) as info:
        check_paths(load_config(None, ["model.tokenizer=/no/such/tokenizer"]))
    assert str(info.value) == "model.tokenizer '/no/such/tokenizer': no such directory, and not a hub id of the form owner/name"


def test_check_paths_names_missing_data_files(tmp_path: Path) -> None:
    from catdpo_ray.config_locations import check_paths

    missing = tmp_path / "none.jsonl"
    with pytest.raises(ConfigError) as info:
        check_paths(load_config(None, [f"data.train={missing}"]))
    assert str(info.value) == f"data.train '{missing}': no such file"
    with pytest.raises(ConfigError) as info:
        check_paths(load_config(None, [f"data.test={tmp_path}"]))
    assert str(info.value) == f"data.test '{tmp_path}': is a directory; name one .jsonl, .json or .parquet file"
    # a hub dataset replaces the files: they are not checked
    check_paths(load_config(None, [f"data.train={missing}", "data.hub_name=PKU-Alignment/PKU-SafeRLHF"]))


def test_check_paths_offline_hub_id_must_be_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With HF_HUB_OFFLINE=1 a hub id must be in the local cache (real huggingface_hub cache lookup)."""
    import huggingface_hub.constants

    from catdpo_ray.config_locations import check_paths

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    cfg = load_config(None, ["model.name_or_path=acme/tiny-llm"])
    with pytest.raises(ConfigError) as info:
        check_paths(cfg)
    assert str(info.value) == ("model.name_or_path 'acme/tiny-llm': HF_HUB_OFFLINE is set and the hub id is not in "
                               "the local Hugging Face cache")
    # the hub cache layout: models--owner--name/refs/main -> commit, snapshots/<commit>/config.json
    repo = tmp_path / "models--acme--tiny-llm"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "config.json").write_text("{}")
    check_paths(cfg)
