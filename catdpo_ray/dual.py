"""Per-category dual variables lambda_k and their projected dual ascent (METHOD.md section 4).

Derivation sketch (Cat-DPO, arXiv 2604.17299; the update rule is derived, not quoted). The
policy solves ``max_pi J_help(pi)`` subject to one constraint per harm category k,
``u_k(pi) <= epsilon_k``, where u_k is the policy's violation (unsafe) rate on category-k pairs.
The Lagrangian ``L(pi, lambda) = J_help(pi) - sum_k lambda_k (u_k(pi) - epsilon_k)``, lambda_k >= 0,
is a saddle problem: the primal step is the Cat-DPO loss with margin m(C) built from lambda
(:func:`catdpo_ray.losses.catdpo_loss`); the dual step is projected gradient ascent on lambda,
whose gradient is ``dL/d(-lambda_k) = u_k - epsilon_k``. Alternating one primal and one dual step
is the Arrow-Hurwicz scheme::

    lambda_k <- clip(lambda_k + eta (v_k / n_k - epsilon_k), 0, lambda_max)

with u_k estimated by v_k / n_k from the all-reduced window sums (only where n_k > 0; a category
absent from the window keeps its lambda). The upper clip keeps the margin bounded.

Worked example (K = 2, eta = 0.5, epsilon = 0.02, lambda_init = 0)::

    update(violations=[1.0, 0.0], counts=[4, 2])  # rates (0.25, 0.0)
        lambda_0 = clip(0 + 0.5 * (0.25 - 0.02)) = 0.115
        lambda_1 = clip(0 + 0.5 * (0.00 - 0.02)) = clip(-0.01) = 0.0
    update(violations=[0.0, 2.5], counts=[0, 5])  # category 0 absent, rate_1 = 0.5
        lambda_0 = 0.115 (kept)
        lambda_1 = clip(0 + 0.5 * (0.5 - 0.02)) = 0.24

This module imports only torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

_STATE_KEYS = ("lambdas", "window_violations", "window_counts", "window_calls", "num_updates", "num_calls",
               "last_rates", "binding")


def _per_category(value: float | Sequence[float], k: int, name: str) -> Tensor:
    """A scalar broadcast to ``[K]`` float64, or a length-K sequence checked and converted."""
    if isinstance(value, (int, float)):
        return torch.full((k,), float(value), dtype=torch.float64)
    values = [float(v) for v in value]
    if len(values) != k:
        raise ValueError(f"{name}: got {len(values)} values, expected one float or {k} (one per category)")
    return torch.tensor(values, dtype=torch.float64)


def _as_vector(value: Tensor | Sequence[float], k: int, name: str) -> Tensor:
    vec = torch.as_tensor(value).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    if vec.numel() != k:
        raise ValueError(f"{name}: expected {k} values (one per category), got {vec.numel()}")
    if not torch.isfinite(vec).all() or (vec < 0).any():
        raise ValueError(f"{name}: values must be finite and >= 0, got {vec.tolist()}")
    return vec


class DualState:
    """The per-category lambda and its windowed projected dual-ascent update.

    Args:
        num_categories: K.
        eta: dual step size (>= 0; 0 freezes lambda, which reproduces SafeDPO with lambda_init = Delta).
        epsilon: violation tolerance, one float or K floats.
        lambda_init: initial lambda, one float or K floats, each in ``[0, lambda_max]``.
        lambda_max: upper clip of lambda.
        update_every: apply the update once every this many :meth:`update` calls; the window sums
            v and n over those calls (sums, not an average of per-call rates).

    Attributes:
        num_updates: applied updates. num_calls: calls to :meth:`update`.
    """

    def __init__(self, num_categories: int, *, eta: float, epsilon: float | Sequence[float],
                 lambda_init: float | Sequence[float] = 0.0, lambda_max: float = 100.0,
                 update_every: int = 1) -> None:
        if num_categories < 1:
            raise ValueError(f"num_categories: must be >= 1, got {num_categories}")
        if eta < 0 or lambda_max < 0 or update_every < 1:
            raise ValueError(f"need eta >= 0, lambda_max >= 0, update_every >= 1; got {eta}, {lambda_max}, "
                             f"{update_every}")
        self.num_categories = num_categories
        self.eta = float(eta)
        self.epsilon = _per_category(epsilon, num_categories, "epsilon")
        self.lambda_max = float(lambda_max)
        self.update_every = int(update_every)
        self._lambdas = _per_category(lambda_init, num_categories, "lambda_init")
        if ((self._lambdas < 0) | (self._lambdas > self.lambda_max)).any():
            raise ValueError(f"lambda_init: {self._lambdas.tolist()} outside [0, lambda_max={self.lambda_max}]")
        self._window_violations = torch.zeros(num_categories, dtype=torch.float64)
        self._window_counts = torch.zeros(num_categories, dtype=torch.float64)
        self._window_calls = 0
        self.num_updates = 0
        self.num_calls = 0
        self._last_rates = torch.full((num_categories,), math.nan, dtype=torch.float64)
        # Never-observed categories count as binding: with no evidence that a constraint holds,
        # the conservative choice keeps its lambda in the margin (agg="binding" then starts as
        # agg="sum", matching catdpo_loss(binding=None)). A category absent from a window keeps
        # its last status, as it keeps its lambda.
        self._binding = torch.ones(num_categories, dtype=torch.bool)

    @property
    def lambdas(self) -> Tensor:
        """``[K]`` float64, a copy."""
        return self._lambdas.clone()

    @property
    def last_rates(self) -> Tensor:
        """``[K]`` float64 rates v_k / n_k of the last applied window; NaN where n_k = 0."""
        return self._last_rates.clone()

    @property
    def binding(self) -> Tensor:
        """``[K]`` bool: last observed window rate > epsilon_k (never observed: True)."""
        return self._binding.clone()

    def update(self, violations: Tensor | Sequence[float], counts: Tensor | Sequence[float]) -> Tensor:
        """Add one step's all-reduced sums to the window; apply the ascent when the window is full.

        Args:
            violations: ``[K]`` v_k, summed over micro-batches and ranks.
            counts: ``[K]`` n_k, the matching pair counts.

        Returns:
            The current lambda, ``[K]`` float64 (a copy).
        """
        v = _as_vector(violations, self.num_categories, "violations")
        n = _as_vector(counts, self.num_categories, "counts")
        self._window_violations += v
        self._window_counts += n
        self._window_calls += 1
        self.num_calls += 1
        if self._window_calls >= self.update_every:
            self._apply()
        return self.lambdas

    def _apply(self) -> None:
        present = self._window_counts > 0
        rates = torch.where(present, self._window_violations / self._window_counts.clamp(min=1), math.nan)
        stepped = (self._lambdas + self.eta * (rates - self.epsilon)).clamp(0.0, self.lambda_max)
        self._lambdas = torch.where(present, stepped, self._lambdas)
        self._binding = torch.where(present, rates > self.epsilon, self._binding)
        self._last_rates = rates
        self._window_violations.zero_()
        self._window_counts.zero_()
        self._window_calls = 0
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (lists, floats, ints, bools; NaN rates as None).

        Hyperparameters are included for provenance; :meth:`load_state_dict` restores the dynamic
        state only, so the run config stays the one source of eta, epsilon and lambda_max.
        """
        return {
            "num_categories": self.num_categories,
            "eta": self.eta,
            "epsilon": self.epsilon.tolist(),
            "lambda_max": self.lambda_max,
            "update_every": self.update_every,
            "lambdas": self._lambdas.tolist(),
            "window_violations": self._window_violations.tolist(),
            "window_counts": self._window_counts.tolist(),
            "window_calls": self._window_calls,
            "num_updates": self.num_updates,
            "num_calls": self.num_calls,
            "last_rates": [None if math.isnan(r) else r for r in self._last_rates.tolist()],
            "binding": self._binding.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore lambda, the partially filled window, counters, rates and binding flags exactly."""
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"DualState state is missing {missing}")
        if state.get("num_categories", len(state["lambdas"])) != self.num_categories:
            raise ValueError(f"DualState state has {state.get('num_categories')} categories, "
                             f"this state has {self.num_categories}")

        def vec(key: str) -> Tensor:
            values = [math.nan if x is None else float(x) for x in state[key]]
            if len(values) != self.num_categories:
                raise ValueError(f"DualState state[{key!r}] has {len(values)} values, expected {self.num_categories}")
            return torch.tensor(values, dtype=torch.float64)

        self._lambdas = vec("lambdas")
        self._window_violations = vec("window_violations")
        self._window_counts = vec("window_counts")
        self._last_rates = vec("last_rates")
        self._binding = vec("binding").bool()
        self._window_calls = int(state["window_calls"])
        self.num_updates = int(state["num_updates"])
        self.num_calls = int(state["num_calls"])

    def __repr__(self) -> str:
        return (f"DualState(K={self.num_categories}, eta={self.eta}, lambda_max={self.lambda_max}, "
                f"update_every={self.update_every}, num_updates={self.num_updates})")
