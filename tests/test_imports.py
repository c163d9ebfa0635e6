"""Every module imports; ``import catdpo_ray`` is cheap and pulls in neither Ray nor DeepSpeed."""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys

import catdpo_ray


def all_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(catdpo_ray.__path__, prefix="catdpo_ray."))


def test_every_module_imports() -> None:
    names = all_modules()
    assert "catdpo_ray.train.worker" in names and "catdpo_ray.losses" in names
    for name in names:
        importlib.import_module(name)


def test_import_is_cheap() -> None:
    code = (
        "import sys, time, json; t = time.perf_counter(); import catdpo_ray, catdpo_ray.config; "
        "dt = time.perf_counter() - t; heavy = [m for m in ('ray', 'deepspeed', 'transformers', 'torch') if m in sys.modules]; "
        "print(json.dumps({'seconds': dt, 'heavy': heavy}))"
    )
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert out["heavy"] == [], out
    assert out["seconds"] < 1.0, out


def test_pure_core_imports_only_torch() -> None:
    """losses, dual and metrics are pure: importing them loads neither Ray, DeepSpeed nor transformers."""
    code = (
        "import sys, json; import catdpo_ray.losses, catdpo_ray.violation, catdpo_ray.dual, catdpo_ray.eval.metrics; "
        "print(json.dumps([m for m in ('ray', 'deepspeed', 'transformers') if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


def test_only_train_touches_deepspeed() -> None:
    import pathlib

    root = pathlib.Path(catdpo_ray.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if "import deepspeed" in p.read_text() and p.parent.name != "train"]
    assert offenders == []


def test_cli_entry_point_and_config_errors() -> None:
    from catdpo_ray.cli import main

    assert main(["config", "dual.eta=0.3"]) == 0
    assert main(["config", "dual.eta=fast"]) == 2
    assert main(["config", "--reference"]) == 0


def test_workers_import_deepspeed_without_mlflow_and_mlflow_still_imports_afterwards() -> None:
    """The worker's DeepSpeed import skips the autotuner's `import mlflow` (seconds per worker start);
    mlflow is importable afterwards. In a fresh process, as a Ray worker starts."""
    code = (
        "import sys, json; from catdpo_ray.train.modeling import import_deepspeed_in_worker as f; ds = f(); "
        "had = 'mlflow' in sys.modules; from deepspeed.autotuning import autotuner; "
        "ok = True\ntry:\n import mlflow\nexcept ImportError:\n ok = False\n"
        "print(json.dumps({'had': had, 'has_mlflow': autotuner.has_mlflow, 'mlflow_after': ok, "
        "'ds': ds is sys.modules['deepspeed']}))"
    )
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"}).stdout.splitlines()[-1])
    assert out == {"had": False, "has_mlflow": False, "mlflow_after": True, "ds": True}
