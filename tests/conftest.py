"""Shared fixtures: the tiny model (built once per session through the real code path)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Ray Train's controller polls its workers every 2 s by default, so each run's end (and each restart after a
# fault) is noticed up to 2 s late: about 2 s of every one of the suite's ~40 Ray Train runs. The controller
# reads this at start-up (the driver's environment reaches it); it changes when a run's end is seen, not
# what the run computes. A value the caller set is kept.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Ray Train 2.60 starts a PreemptionWatcher actor (a process of its own, polling the cloud provider's
# preemption notices) at every worker-group start; nothing can be preempted here.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


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


@pytest.fixture
def ray_session() -> None:
    """Ray up in this process: the local cluster ``catdpo-ray train`` starts (``init_ray``; a no-op while
    one is up), left running for the tests after it, as runs in one process share it."""
    from catdpo_ray.config import load_config
    from catdpo_ray.ray_session import init_ray

    init_ray(load_config(None))
