"""Exact per-step statistics: what each micro-batch adds, and the metrics row of a global step.

Every quantity is a float64 *sum* so micro-batches and ranks combine with one SUM all-reduce
(STYLE.md: metrics that feed the dual update are exact, never "last micro-batch of rank 0").
The vector layout is ``[n (K) | v (K) | SCALARS]``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from catdpo_ray.losses import LossOutput, PreferenceBatch
from catdpo_ray.violation import violation_stats

#: Scalar sums that follow the 2K per-category entries of the step statistics vector.
SCALARS = ("loss_sum", "pairs", "acc_sum", "margin_sum", "chosen_reward_sum", "rejected_reward_sum", "tokens",
           "dpo_loss_sum", "padded_tokens")


def micro_stats(pb: PreferenceBatch, out: LossOutput, real_tokens: int, token_slots: int, *, beta: float,
                signal: str) -> torch.Tensor:
    """``[n (K) | v (K) | SCALARS]`` of one micro-batch, float64 on the CPU.

    Args:
        pb: the micro-batch's log-probs (``[B]`` each). out: its loss output.
        real_tokens: tokens of the micro-batch's sequences. token_slots: the token positions the model
            computed (rows x length, padding included; packed rows have little padding).
        beta: DPO beta. signal: the offline violation signal (``soft`` / ``hard`` / ``likelihood``).
    """
    n, v = violation_stats(pb, beta=beta, signal=signal)
    cr, rr = out.chosen_rewards.detach().double(), out.rejected_rewards.detach().double()
    scalars = torch.stack([
        out.losses.detach().double().sum().cpu(), torch.tensor(float(cr.numel()), dtype=torch.float64),
        (cr > rr).double().sum().cpu(), (cr - rr).sum().cpu(), cr.sum().cpu(), rr.sum().cpu(),
        torch.tensor(float(real_tokens), dtype=torch.float64),
        # The margin-free DPO loss -log sigma(r_w - r_l): comparable across steps while lambda moves.
        -torch.nn.functional.logsigmoid(cr - rr).sum().cpu(),
        torch.tensor(float(token_slots), dtype=torch.float64),
    ])
    return torch.cat([n.cpu(), v.cpu(), scalars])


def digest(t: torch.Tensor) -> str:
    """A short hash of a tensor's float64 bytes (equal digests = bit-identical values)."""
    return hashlib.sha256(t.to(torch.float64).numpy().tobytes()).hexdigest()[:16]


def step_row(glob: torch.Tensor, k: int, dt: float, step: int, epoch: int, lr: float, world: int,
             gathered: torch.Tensor | None, categories: list[str]) -> dict[str, Any]:
    """One step's metrics row from the all-reduced statistics ``glob`` ``[2K + len(SCALARS)]``.

    ``gathered`` ``[world, K]``: the lambda every rank used this step (``None`` on steps where the
    identity check did not run).
    """
    s = dict(zip(SCALARS, glob[2 * k :].tolist()))
    pairs = max(s["pairs"], 1.0)
    n, v = glob[:k], glob[k : 2 * k]
    row: dict[str, Any] = {
        "step": step,
        "epoch": epoch,
        "loss": s["loss_sum"] / pairs,
        "dpo_loss": s["dpo_loss_sum"] / pairs,
        "reward_acc": s["acc_sum"] / pairs,
        "reward_margin": s["margin_sum"] / pairs,
        "chosen_reward": s["chosen_reward_sum"] / pairs,
        "rejected_reward": s["rejected_reward_sum"] / pairs,
        "pairs": int(s["pairs"]),
        "pairs_per_s": s["pairs"] / dt,
        "tokens_per_s": s["tokens"] / dt,
        "padding_share": 1.0 - s["tokens"] / s["padded_tokens"] if s["padded_tokens"] > 0 else 0.0,
        "step_time_s": dt,
        "lr": lr,
        "world_size": world,
        "violation_rate": {c: (float(v[i] / n[i]) if n[i] > 0 else None) for i, c in enumerate(categories)},
    }
    if gathered is not None:
        # Per-rank digests of the lambda each rank used (all-gathered): equal digests = bit-identical.
        row["lambda_digests"] = [digest(g) for g in gathered]
    return row
