"""The in-training held-out evaluation: every test pair scored exactly once across the workers.

Ray Train's default ``DataConfig`` splits every dataset equally and drops the remainder
(RAY_DEEPSPEED_NOTES.md pitfall 14), which lost test pairs and could make a small category vanish.
The trainer therefore lets Ray Train split nothing (``DataConfig(datasets_to_split=[])``; the
training split comes as one dataset per rank, made by the driver): every rank iterates the whole
test split in the same batches and scores batch ``i`` iff ``i % world == rank``. Ranks run the same number of forward passes (a rank without a batch in the
last round forwards a copy of its previous one with weight 0), because under ZeRO-3 every forward
is a collective of parameter gathers. The counts are summed with one all-reduce.

The reference log-probs come from the batch's precomputed ``ref_*`` columns when present (the
reference stage), else from the online reference engine: never from the policy being trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from catdpo_ray.eval.preference import EvalAccumulator, eval_row
from catdpo_ray.train import dist as D
from catdpo_ray.train.models import Models, preference_batch


def heldout_eval(models: Models, shard: Any, collate: Callable[[dict[str, Any]], dict[str, torch.Tensor]], *,
                 batch_size: int, num_rows: int, categories: list[str], beta: float, lambdas: torch.Tensor,
                 binding: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """Per-category held-out preference accuracy (an ``eval_row``), identical on every rank.

    Args:
        models: the worker's models. collate: the training collate (padding, ``ref_*`` columns).
        shard: this rank's view of the (unsplit) test dataset.
        num_rows: rows in the test split (from the driver), to size the rounds without a collective.
        lambdas, binding: ``[K]`` current dual state (only the loss would read it; kept for symmetry).
    """
    world, rank = D.world_size(), D.rank()
    acc = EvalAccumulator(len(categories))
    num_batches = math.ceil(num_rows / batch_size)
    rounds = math.ceil(num_batches / world)
    it = iter(shard.iter_torch_batches(batch_size=batch_size, drop_last=False, collate_fn=collate))
    engine = models.engine
    engine.eval()
    mine = None
    seen = 0
    try:
        for r in range(rounds):
            batch = None
            for i in range(r * world, min((r + 1) * world, num_batches)):
                b = next(it)
                seen += 1
                if i % world == rank:
                    batch = b
                mine = mine if mine is not None else b
            weight = 1.0 if batch is not None else 0.0
            # A rank without a batch in this round still forwards (weight 0): ZeRO-3 gathers are collectives.
            batch = batch if batch is not None else mine
            assert batch is not None  # every round holds at least one batch
            mine = batch
            b = {k: v.to(device) for k, v in batch.items()}
            with torch.no_grad():
                pb = preference_batch(models, b, lambdas, binding, with_grad=False, need_mi=False)
                acc.add(pb, b["chosen_safe"], b["rejected_safe"], beta=beta, weight=weight)
    finally:
        engine.train()
    if next(it, None) is not None or seen != num_batches:
        raise RuntimeError(f"the test split changed size: expected {num_rows} rows in {num_batches} batches")
    return eval_row(D.all_reduce(acc.totals, device), categories)
