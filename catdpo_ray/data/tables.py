"""Tokenized pairs as one Arrow table in the driver, and the Ray datasets made from it.

Data preparation holds every record in the driver anyway (they were read and validated there), so
the tokenized columns, the reference columns and the train/test split are built on one
``pyarrow.Table`` in this process, in the order the driver chose, and only the finished splits become
Ray datasets (:func:`to_dataset`: blocks put in the object store, no tasks). Nothing here starts a
Ray task, so no step can reorder rows and no fresh worker process pays its imports; the one Ray Data
stage left is the reference scoring of a GPU run's cache miss (an actor pool, :mod:`.reference`).

The columns keep the types Ray Data gives a ``map_batches`` output (token ids: Ray's variable-shaped
tensor extension, int32; the category mask: its fixed-shape tensor extension, int8), so workers read
the same batches either way.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def batch_to_table(batch: dict[str, Any]) -> Any:
    """A numpy batch (columns of equal length) -> ``pyarrow.Table`` with Ray's tensor column types."""
    from ray.data.block import BlockAccessor

    return BlockAccessor.batch_to_block(batch)


def to_dataset(table: Any, num_blocks: int) -> Any:
    """``table`` -> a materialised Ray dataset of ``min(num_blocks, rows)`` contiguous blocks (>= 1), in order."""
    import ray.data

    rows = table.num_rows
    n = max(1, min(num_blocks, rows))
    bounds = np.linspace(0, rows, n + 1).astype(int)
    # from_blocks keeps exactly these blocks and reads their metadata here (from_arrow would run a Ray
    # task per call for it: a worker process to start on a cold cluster).
    return ray.data.from_blocks([table.slice(int(a), int(b - a)) for a, b in zip(bounds[:-1], bounds[1:])])


def dataset_table(ds: Any) -> Any:
    """A materialised Ray dataset -> one ``pyarrow.Table`` here, its blocks in the dataset's order."""
    import pyarrow as pa
    import ray

    blocks = ray.get(ds.materialize().to_arrow_refs())
    if not blocks:
        raise ValueError("the dataset has no blocks")
    return pa.concat_tables(blocks)


def train_shard_name(rank: int) -> str:
    """The name under which rank ``rank`` finds its training dataset (:func:`rank_shards`)."""
    return f"train_rank{rank}"


def rank_shards(ds: Any, world: int) -> list[Any]:
    """The training split -> ``world`` datasets of equal size, rank ``r`` holding rows ``r, r + world, ...``
    (strided: global batch ``i`` is then rows ``i*G .. (i+1)*G - 1`` of the driver's order before the
    workers' local shuffle). The last ``rows % world`` rows are left out (every rank takes the same
    number of steps); :func:`~catdpo_ray.data.loader.dropped_per_epoch` counts them with the trailing pairs.

    Made here, in the driver, from the materialised blocks: deterministic (the same rows go to the same
    rank on every run and resume) and with no Ray Data coordinator actor to start, as
    ``streaming_split`` needs one per run.
    """
    table = dataset_table(ds)
    per_rank = table.num_rows // world
    blocks = max(2, -(-per_rank // 8192))  # a few blocks per rank; about 8k pairs each on large splits
    return [to_dataset(table.take(np.arange(r, per_rank * world, world)), blocks) for r in range(world)]


def column(table: Any, name: str) -> np.ndarray:
    """One scalar column as a numpy array."""
    return table.column(name).to_numpy()
