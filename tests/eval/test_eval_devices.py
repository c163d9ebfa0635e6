"""Device placement of the evaluation, checked without a GPU (issue 9, part 3).

:class:`VirtualAccelerator` marks tensors the program moved to ``cuda:0`` and fails where CUDA
would. With :func:`catdpo_ray.eval.devices.accelerator` answering ``cuda:0``, the real evaluation
code (tiny HF model via ``from_pretrained``) runs inside the mode: every model input and every
tensor an op combines with a device tensor must be on the model's device. Results must equal a plain
CPU run, so the check changes nothing but placement bookkeeping. On the code before the fix this
test failed with ``TensorBase.mul got a host tensor of shape (8, 19) and dtype torch.float64``: the
host category mask met the device log-probs in ``EvalAccumulator.add``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from catdpo_ray.config import load_config
from catdpo_ray.eval import devices
from catdpo_ray.eval.devicecheck import VirtualAccelerator, on_device
from catdpo_ray.losses import PreferenceBatch

CUDA = torch.device("cuda", 0)


# ---------------------------------------------------------------------------------------------
# the checking tool itself


def test_virtual_accelerator_tracks_moves_and_refuses_mixing() -> None:
    host = torch.arange(6.0).reshape(2, 3)
    with VirtualAccelerator("cuda:0") as va:
        dev = host.to("cuda")
        assert on_device(dev) and not on_device(host) and dev is not host  # the source keeps its placement
        assert dev.device == CUDA and host.device.type == "cpu"
        assert on_device(dev * 2) and on_device(dev + torch.tensor(1.0))  # a host 0-dim tensor is a scalar
        with pytest.raises(RuntimeError, match=r"host tensor of shape \(2, 3\)"):
            _ = dev + host
        with pytest.raises(RuntimeError, match="same device"):
            torch.cat([dev, host])
        back = dev.cpu()
        assert not on_device(back) and torch.equal(back + host, 2 * host)
        assert on_device(torch.zeros(3, device=CUDA)) and not on_device(torch.zeros(3))
        assert on_device(torch.zeros_like(dev)) and on_device(host.to(dev))  # to(other): other's device
        with pytest.raises(TypeError, match="Use Tensor.cpu"):
            dev.numpy()
        assert on_device(dev[torch.tensor([1, 0])]) and dev[torch.tensor([1, 0])].shape == (2, 3)  # host indices are fine
        lin = torch.nn.Linear(3, 1).to(CUDA)
        assert all(on_device(p) for p in lin.parameters()) and next(lin.parameters()).device == CUDA
        with pytest.raises(RuntimeError, match="same device"):
            lin(host)
        assert on_device(lin(dev)) and va.moved >= 5 and va.checked > 0


# ---------------------------------------------------------------------------------------------
# the evaluation under the check


@pytest.fixture
def virtual_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The evaluation code believes it runs on cuda:0 (one function decides the device)."""
    monkeypatch.setattr(devices, "accelerator", lambda: CUDA)


def _pairs(cfg, tmp: Path) -> list[dict]:  # noqa: ANN001 - RunConfig
    from catdpo_ray.data.loader import load_split

    pairs, _ = load_split(cfg.data, "test", pair_mode="safety_aware", quarantine_path=tmp / "q.jsonl")
    return pairs


def test_preference_fluency_generation_and_scoring_place_every_tensor_on_the_models_device(
        tiny_model_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from catdpo_ray.eval.generation import Generator, generator_kwargs
    from catdpo_ray.eval.judges import SequenceScorer
    from catdpo_ray.eval.runner import preference_eval, reference_nll
    from tests.eval.test_eval_judges import COST_TEXT, SAFE_TEXT, build_cost_model

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "data.max_test_rows=12", "eval.batch_size=8",
                             "eval.max_new_tokens=4"])
    pairs = _pairs(cfg, tmp_path)
    cost = build_cost_model(tmp_path / "cost")
    prompts, answers = ["How do I bake bread?", "Tell me a secret."], ["Mix flour and water.", ""]

    def run_all() -> tuple:
        pref = preference_eval(cfg, tiny_model_dir, tiny_model_dir, tiny_model_dir, pairs)
        nll = reference_nll(cfg, tiny_model_dir, tiny_model_dir, prompts, answers)
        gen = Generator(**generator_kwargs(cfg, tiny_model_dir, tiny_model_dir))
        texts = gen.generate(prompts)
        scores = SequenceScorer(cost).scores(["p", "p"], [SAFE_TEXT, COST_TEXT])
        return pref, nll, texts, scores

    expected = run_all()  # plain CPU
    with monkeypatch.context() as m:
        m.setattr(devices, "accelerator", lambda: CUDA)
        with VirtualAccelerator(CUDA) as va:
            got = run_all()
    assert va.moved > 0 and va.checked > 1000  # the models really ran "on the device"
    assert got[0]["per_category"] == expected[0]["per_category"] and sum(e["n"] for e in got[0]["per_category"].values())
    assert got[1] == pytest.approx(expected[1]) and got[1][1] == float("inf")  # empty answer: inf
    assert got[2] == expected[2]
    assert got[3] == pytest.approx([-2.0, 3.0], abs=1e-4)


def test_the_check_catches_a_host_category_mask(tiny_model_dir: str, tmp_path: Path, virtual_cuda: None) -> None:
    """The bug of issue 9 in its original shape: log-probs on the device, the batch's mask on the host."""
    from transformers import AutoModelForCausalLM

    from catdpo_ray.eval.preference import EvalAccumulator
    from catdpo_ray.losses import sequence_logps

    ids = torch.tensor([[1, 5, 6, 7], [1, 5, 8, 9]])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with VirtualAccelerator(CUDA):
        model.to(devices.accelerator())
        dev_ids = ids.to(devices.input_device(model))
        logps, counts = sequence_logps(model(input_ids=dev_ids).logits, dev_ids, torch.ones_like(dev_ids))
        pb = PreferenceBatch(policy_chosen_logps=logps[:1], policy_rejected_logps=logps[1:], chosen_tokens=counts[:1],
                             rejected_tokens=counts[1:], ref_chosen_logps=logps[:1], ref_rejected_logps=logps[1:],
                             safety_gap=torch.tensor([1.0]), category_mask=torch.tensor([[1.0, 0.0]]))
        with pytest.raises(RuntimeError, match=r"host tensor of shape \(1, 2\)"):
            EvalAccumulator(2).add(pb, torch.tensor([True]), torch.tensor([False]), beta=0.1)


def test_device_map_auto_without_a_gpu_is_the_cpu(tiny_model_dir: str) -> None:
    from transformers import AutoModelForCausalLM

    model = devices.load_hf_model(AutoModelForCausalLM, tiny_model_dir, device_map="auto", bf16=True)
    assert {p.device.type for p in model.parameters()} == {"cpu"} and not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # bf16 only on a GPU
    assert devices.input_device(model).type == "cpu"


# ---------------------------------------------------------------------------------------------
# the generation pool and the vLLM engine's config


@pytest.mark.parametrize(("overrides", "expected"), [
    ([], (2, 1.0, 0.0)),                                             # default: scaling.num_workers CPU actors
    (["scaling.use_gpu=true"], (2, 1.0, 1.0)),                        # one GPU per actor
    (["eval.num_actors=1", "eval.num_gpus_per_actor=4"], (1, 1.0, 4.0)),  # a 70B replica over 4 GPUs
    (["scaling.num_workers=0", "eval.num_gpus_per_actor=0.5"], (1, 1.0, 0.5)),
])
def test_pool_resources(overrides: list[str], expected: tuple[int, float, float]) -> None:
    from catdpo_ray.eval.generation import pool_resources

    cfg = load_config(None, ["scaling.cpus_per_worker=1", *overrides])
    res = pool_resources(cfg)
    assert (res.actors, res.cpus, res.gpus) == expected


def test_pool_refuses_fractional_gpus_above_one() -> None:
    from catdpo_ray.eval.generation import pool_resources

    with pytest.raises(ValueError, match=r"eval.num_gpus_per_actor=1.5: above 1 it must be a whole number"):
        pool_resources(load_config(None, ["eval.num_gpus_per_actor=1.5"]))


def test_vllm_engine_config_and_missing_vllm(tiny_model_dir: str) -> None:
    from catdpo_ray.eval.generation import Generator, generator_kwargs
    from catdpo_ray.eval.vllm_engine import (
        encode_prompts,
        generate_vllm,
        processor_config,
        sampling_params,
        vllm_available,
    )

    cfg = load_config(None, ["eval.engine=vllm", "eval.num_actors=2", "eval.num_gpus_per_actor=4", "train.precision=bf16",
                             "eval.vllm_engine_kwargs={gpu_memory_utilization: 0.8}", "eval.temperature=0.7"])
    pc = processor_config(cfg, "/models/llama-70b")
    assert pc.model_source == "/models/llama-70b" and pc.concurrency == 2 and pc.batch_size == cfg.eval.batch_size
    assert pc.engine_kwargs["tensor_parallel_size"] == 4 and pc.engine_kwargs["dtype"] == "bfloat16"
    assert pc.engine_kwargs["gpu_memory_utilization"] == 0.8 and pc.engine_kwargs["trust_remote_code"] is False
    assert pc.chat_template_stage is False and pc.tokenize_stage is False  # our own prompt format
    assert sampling_params(cfg, 3) == {"max_tokens": 48, "temperature": 0.7, "skip_special_tokens": True,
                                       "top_p": 1.0, "seed": cfg.train.seed * 1_000_003 + 3}
    kwargs = generator_kwargs(cfg, tiny_model_dir, tiny_model_dir)
    ids = encode_prompts(kwargs, ["hello there"])
    gen = Generator(**generator_kwargs(cfg.replace(["eval.engine=hf"]), tiny_model_dir, tiny_model_dir))
    assert ids == [gen.encode("hello there")]  # the same token ids as the HF path
    if not vllm_available():
        with pytest.raises(ImportError, match=r"pip install 'catdpo-ray\[vllm\]'"):
            generate_vllm(cfg, kwargs, ["hello"])


def test_eval_imports_no_trainer_and_compare_panels_form_no_cycle() -> None:
    """Layering (issue 9): evaluation sits below training; compare -> panels -> sources, never back."""
    import ast

    root = Path(__file__).resolve().parents[2] / "catdpo_ray" / "eval"
    imports: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        imports[path.stem] = names
    assert not {m for names in imports.values() for m in names if m.startswith("catdpo_ray.train")}
    assert "catdpo_ray.eval.compare" not in imports["panels"] and "catdpo_ray.eval.panels" in imports["compare"]
    assert "catdpo_ray.eval.compare" not in imports["sources"] and "catdpo_ray.eval.panels" not in imports["sources"]
    assert imports["devicecheck"] <= {"__future__", "collections.abc", "typing", "torch", "torch.overrides",
                                      "torch.utils._pytree"}  # pure torch
