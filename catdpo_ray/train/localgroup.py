"""A 1-rank gloo process group for Ray Train local mode (``scaling.num_workers=0``).

Local mode runs the worker function in-process without a process group; DeepSpeed needs one.
The group (and DeepSpeed's cached view of it) is torn down afterwards, so a later local run in the
same process (tests, sweeps in local mode) starts from a clean slate.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def release_local_group() -> None:
    """Destroy the local group (if any) and DeepSpeed's cached communication backend."""
    import deepspeed.comm as ds_comm
    import torch.distributed as dist

    if dist.is_initialized():
        ds_comm.destroy_process_group() if ds_comm.comm.cdb is not None else dist.destroy_process_group()
    ds_comm.comm.cdb = None


def init_local_group() -> None:
    """Create a fresh 1-rank gloo group (releasing any previous one)."""
    import torch.distributed as dist

    release_local_group()
    # One rank needs no rendezvous: an in-memory store, no port (a free-port probe can race another process).
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


@contextmanager
def local_process_group() -> Iterator[None]:
    """Hold a fresh 1-rank gloo group for the duration of the block."""
    init_local_group()
    try:
        yield
    finally:
        release_local_group()
