"""Starting or joining a Ray cluster: the one low module every package uses for it.

Training (``train/driver.py``), sweeps (``tune/``) and evaluation (``eval/generation.py``) all
need a Ray session. The helpers live here, below all of them, so that evaluation never imports the
trainer's driver (ARCHITECTURE.md "Principles"). Ray is imported lazily: ``import
catdpo_ray.ray_session`` stays cheap.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from catdpo_ray.config import RunConfig


def ray_address(cfg: RunConfig) -> str | None:
    """The cluster to join: ``scaling.ray_address``, else ``$RAY_ADDRESS``, else None (start a local one)."""
    return cfg.scaling.ray_address or os.environ.get("RAY_ADDRESS") or None


def ray_wanted(cfg: RunConfig) -> bool:
    """True when Ray is already up in this process or a cluster address is configured."""
    if ray_address(cfg):
        return True
    import ray

    return bool(ray.is_initialized())


def init_ray(cfg: RunConfig) -> None:
    """Connect to :func:`ray_address` or start a local cluster; a no-op when Ray is already up.

    Ray Data is set to preserve row order through ``map_batches`` (same seed and data, same
    batches: the resume and evaluation contracts rely on it) and to keep its progress bars and
    start-of-execution banners off the console.
    """
    import ray

    if ray.is_initialized():
        return
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Ray Data re-installs its console handler whenever a process first iterates a dataset and then says,
    # once per process, that progress bars are off (they are, on purpose): that notice is spent here.
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")
    # Deterministic row order through map_batches: same seed + same data = same batches.
    ctx.execution_options.preserve_order = True
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    from catdpo_ray.train.console import worker_env

    for key, value in worker_env(use_gpu=cfg.scaling.use_gpu).items():
        os.environ.setdefault(key, value)  # local mode trains in this process
    address = ray_address(cfg)
    # Quiet framework start-up in every worker (transformers advisories, DeepSpeed's accelerator notice).
    runtime_env = {"env_vars": worker_env(use_gpu=cfg.scaling.use_gpu)}
    if address:
        # A submitted job already has a runtime env (working dir, env vars) that Ray refuses to merge with
        # another: the workers inherit the job's; only this driver process is quieted (above).
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True, configure_logging=True, logging_level="WARNING",
                 runtime_env=runtime_env)
