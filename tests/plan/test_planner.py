"""Every job file fits the hardware its header names; verdicts, fixes and the CLI's exit codes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from catdpo_ray.cli import main
from catdpo_ray.config import load_config
from catdpo_ray.plan import Hardware, format_plan, parse_size, preflight
from catdpo_ray.plan.memory import CPU_WORKER_BASELINE, GIB

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures"
#: Hub ids the jobs name -> the fixture holding their public config.json.
MODEL_FIXTURES = {"meta-llama/Llama-2-7b-hf": "llama-2-7b", "meta-llama/Llama-2-13b-hf": "llama-2-13b",
                  "meta-llama/Llama-2-70b-hf": "llama-2-70b", "Qwen/Qwen3-8B": "qwen3-8b"}


def header_hardware(job: Path) -> Hardware:
    """The ``# Hardware:`` paragraph of a job file: GPU memory, GPUs per node, host RAM per node."""
    text = " ".join(line.lstrip("# ").strip() for line in job.read_text().splitlines() if line.startswith("#"))
    hw = text[text.index("Hardware:"):]
    gpus = re.search(r"(\d+)\s*NVIDIA\s+[A-Z0-9/]+\s+(\d+)\s*GB", hw)
    ram = re.search(r"(\d+)\+?\s*(GB|TB)\s+(?:of\s+)?RAM", hw)
    host = None if ram is None else int(ram.group(1)) * (10**12 if ram.group(2) == "TB" else 10**9)
    if gpus is None:
        return Hardware(gpu_memory=0, gpus_per_node=1, host_memory=host)
    return Hardware(gpu_memory=int(gpus.group(2)) * 10**9, gpus_per_node=int(gpus.group(1)), host_memory=host)


def test_header_parser_reads_the_13b_header() -> None:
    assert header_hardware(ROOT / "jobs" / "llama2_13b_pku.yaml") == Hardware(40 * 10**9, 8, 10**12)


@pytest.mark.parametrize("job", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_job_fits_the_hardware_its_header_names(job: Path, tiny_model_dir: str) -> None:
    cfg = load_config(str(job), [])
    model = tiny_model_dir if cfg.model.name_or_path == "tiny" else str(FIXTURES / MODEL_FIXTURES[cfg.model.name_or_path])
    hw = header_hardware(job)
    if not cfg.scaling.use_gpu:
        assert hw.host_memory is not None, f"{job.name}: a CPU job's header must name its RAM"
    result = preflight(cfg, model, hw)
    assert result.fits, format_plan(result)
    assert result.exit_code == 0


def _seven_b(overrides: list[str]) -> object:
    return load_config(str(ROOT / "jobs" / "llama2_7b_pku.yaml"),
                       [f"model.name_or_path={FIXTURES / 'llama-2-7b'}", *overrides])


def test_fix_is_a_valid_override_that_fits() -> None:
    """7B at ZeRO-0 without checkpointing, micro-batch 8, on 94 GiB GPUs (H100 NVL): ZeRO-0 model states
    alone are 20 x 6.74e9 B = 125.5 GiB, so checkpointing cannot help; ZeRO-1 (115 GiB) and ZeRO-2
    (103 GiB) leave the 51.8 GiB of activations with the reference copy; ZeRO-3 (83.0 GiB, the retained
    gathered parameters of policy and reference included) is the first single change that fits."""
    cfg = _seven_b(["train.zero_stage=0", "model.gradient_checkpointing=false", "train.micro_batch_size=8",
                    "model.reference=online"])
    result = preflight(cfg, str(FIXTURES / "llama-2-7b"), Hardware(94 * GIB, 8))
    assert not result.fits and result.exit_code == 3
    assert result.fix == ["train.zero_stage=3"]
    fixed = preflight(cfg.replace(result.fix), str(FIXTURES / "llama-2-7b"), Hardware(94 * GIB, 8))
    assert fixed.fits and fixed.plan.device_total == result.fix_plan.device_total


def test_micro_batch_fix_keeps_the_global_batch() -> None:
    """7B, ZeRO-3, checkpointing on, 4096 tokens, micro-batch 8 on 48 GiB GPUs: 69.7 GiB planned, mostly
    the [16, 4096, 32000] logits and one recomputed layer; micro-batch 4 still needs 48.01 GiB, so it is
    quartered to 2 and grad_accum goes 4 -> 16: the global batch (2 x 16 x 8 = 256 pairs) stays."""
    cfg = _seven_b(["model.reference=online", "data.max_length=4096", "train.micro_batch_size=8"])
    result = preflight(cfg, str(FIXTURES / "llama-2-7b"), Hardware(48 * GIB, 8))
    assert not result.fits
    assert result.fix == ["train.micro_batch_size=2", "train.grad_accum=16"]
    fixed_cfg = cfg.replace(result.fix)
    assert fixed_cfg.global_batch_size == cfg.global_batch_size == 256
    assert preflight(fixed_cfg, str(FIXTURES / "llama-2-7b"), Hardware(48 * GIB, 8)).fits


def test_cpu_run_reports_host_memory_per_worker(tiny_model_dir: str) -> None:
    """use_gpu=false: everything is host memory; per node = workers x (model lines + process baseline)."""
    cfg = load_config(str(ROOT / "jobs" / "tiny_cpu.yaml"), ["scaling.num_workers=3"])
    result = preflight(cfg, tiny_model_dir, Hardware(host_memory=64 * GIB))
    assert result.plan.host_per_node == 3 * (result.plan.device_total + CPU_WORKER_BASELINE)
    assert "per CPU worker (host memory)" in format_plan(result) and result.fits
    small = preflight(cfg, tiny_model_dir, Hardware(host_memory=2 * GIB))
    assert not small.fits and small.problems[0].startswith("3 CPU worker(s) x ")


def test_parse_size() -> None:
    assert (parse_size("80GiB"), parse_size("40GB"), parse_size("1.5TiB"), parse_size("16")) == (
        80 * 2**30, 40 * 10**9, int(1.5 * 2**40), 16 * 2**30)
    with pytest.raises(ValueError, match="--gpu-memory: '80XB'"):
        parse_size("80XB", what="--gpu-memory")


def test_cli_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    """0 fits, 3 does not (with the fix printed as key=value), 2 for a bad key or a bad size."""
    job = str(ROOT / "jobs" / "llama2_7b_pku.yaml")
    model = f"model.name_or_path={FIXTURES / 'llama-2-7b'}"
    assert main(["plan", "--config", job, model]) == 0
    assert "verdict: FITS" in capsys.readouterr().out
    assert main(["plan", "--config", job, "--gpu-memory", "16GiB", model]) == 3
    out = capsys.readouterr().out
    assert "verdict: DOES NOT FIT: per GPU" in out and "smallest change that fits: " in out
    assert main(["plan", "--config", job, model, "train.no_such_key=1"]) == 2
    assert "train.no_such_key" in capsys.readouterr().err
    assert main(["plan", "--config", job, "--gpu-memory", "lots", model]) == 2
    assert main(["plan", "--config", job, "model.name_or_path=/nonexistent/model-dir"]) == 2
