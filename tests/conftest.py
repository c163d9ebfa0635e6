"""Shared fixtures: the tiny model (built once per session through the real code path)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """The bundled tiny Llama, built (or reused) in $CATDPO_CACHE, loaded via from_pretrained."""
    from catdpo_ray.tiny import ensure_tiny_model

    cache = os.environ.get("CATDPO_CACHE") or str(Path.home() / ".cache" / "catdpo_ray")
    return str(ensure_tiny_model(cache))


@pytest.fixture(autouse=True)
def _no_leftover_zero3_config() -> None:
    """A ZeRO-3 engine built in a test registers transformers' global HfDeepSpeedConfig; while it lives,
    every later ``from_pretrained`` in the process partitions weights (zero.Init). Reset it after each test."""
    yield
    import sys

    if "transformers.integrations.deepspeed" in sys.modules:
        sys.modules["transformers.integrations.deepspeed"].unset_hf_deepspeed_config()
