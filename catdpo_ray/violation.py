"""Offline violation estimates of the Cat-DPO dual update (METHOD.md section 4).

From a training batch's safe-vs-unsafe pairs (``safety_gap = 1``): how often the implicit reward
(``soft`` / ``hard``) or the policy's own likelihood (``likelihood``) still prefers the unsafe
answer, summed per category. The on-policy estimate (``dual.violation=generation``) lives in
:mod:`catdpo_ray.train.onpolicy`. This module imports only torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from catdpo_ray.losses import PreferenceBatch, _means, _need, _sums

#: Soft violations are rounded to this grid so their float64 sums are exact and independent of
#: summation order (micro-batches, ranks): values k * 2^-32 add exactly while the total < 2^21.
_VIOLATION_GRID = 2.0**-32


def _beta_delta(b: PreferenceBatch, beta: float, signal: str) -> Tensor:
    pc, pr, rc, rr = (t.double() for t in _sums(b, f"violation signal {signal!r}"))
    return beta * ((pc - rc) - (pr - rr))


def _soft(b: PreferenceBatch, beta: float) -> Tensor:
    # Round to the grid so the all-reduced float64 sums are exact in any order (see _VIOLATION_GRID).
    return torch.round(torch.sigmoid(-_beta_delta(b, beta, "soft")) / _VIOLATION_GRID) * _VIOLATION_GRID


def _hard(b: PreferenceBatch, beta: float) -> Tensor:
    return (_beta_delta(b, beta, "hard") <= 0).double()


def _likelihood(b: PreferenceBatch, beta: float) -> Tensor:
    mean_w, mean_l = _means(b, [b.policy_chosen_logps.double(), b.policy_rejected_logps.double()])
    return (mean_l >= mean_w).double()


#: ``violation`` option -> per-pair violation ``[B]`` float64 (METHOD.md section 4).
VIOLATION_SIGNALS: dict[str, Callable[[PreferenceBatch, float], Tensor]] = {
    "soft": _soft, "hard": _hard, "likelihood": _likelihood,
}


@torch.no_grad()
def violation_stats(batch: PreferenceBatch, *, beta: float, signal: str) -> tuple[Tensor, Tensor]:
    """Per-category pair counts n_k and violation sums v_k (Cat-DPO, METHOD.md section 4, derived).

    Over pairs with ``safety_gap = 1`` and k in C. Signals: ``soft`` sigma(-beta Delta) (soft values
    rounded to a 2^-32 grid), ``hard`` 1[beta Delta <= 0], ``likelihood``
    1[mean log pi_theta(y_l) >= mean log pi_theta(y_w)] (no reference). All values are float64
    multiples of 2^-32, so sums over micro-batches and ranks are exact: the statistics of two
    halves summed equal those of the whole batch bit for bit.

    Returns:
        ``(counts, violations)``, both ``[K]`` float64, on the batch's device.
    """
    if signal not in VIOLATION_SIGNALS:
        raise ValueError(f"unknown violation signal {signal!r}; valid: {sorted(VIOLATION_SIGNALS)}")
    gap, mask = _need(batch, f"violation signal {signal!r}", "safety_gap", "category_mask")
    selected = (gap.bool().unsqueeze(-1) & mask.bool()).double()  # [B, K]
    per_pair = VIOLATION_SIGNALS[signal](batch, beta).to(selected.device)  # [B]
    return selected.sum(0), (selected * per_pair.unsqueeze(-1)).sum(0)
