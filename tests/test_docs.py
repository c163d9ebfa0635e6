"""The README's commands and the generated config reference stay in sync with the code."""

from __future__ import annotations

from pathlib import Path

from catdpo_ray.config_docs import config_reference

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in (ROOT / "README.md").read_text()


def test_config_reference_is_current() -> None:
    assert config_reference() in (ROOT / "docs" / "CONFIG.md").read_text()
