"""Preference losses over sequence log-probabilities (METHOD.md sections 2-4).

Every loss is a small pure function of per-example log-prob tensors that returns the
per-example loss ``Tensor[B]``; the training loop reduces. ``LOSSES`` maps a config name to a
uniform ``(PreferenceBatch, LossParams) -> LossOutput`` adapter, so adding a loss touches this
file and its test only. Notation: ``pc, pr`` policy log-probs of the chosen / rejected response
(sums over response tokens), ``rc, rr`` the reference's, and
``Delta = (pc - rc) - (pr - rr)``. This module imports only torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


class _LabelLogProb(torch.autograd.Function):
    """``log_softmax(logits)[label]`` per position, one sequence at a time in float32.

    Autograd through a float32 upcast would keep a float32 copy of all ``[N, T, V]`` logits alive
    until backward; this saves only the input logits and the ``[N, T]`` logsumexp and recomputes
    the softmax row by row in backward: d/dlogits = grad * (onehot(label) - softmax).
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, labels: Tensor, dtype: torch.dtype) -> Tensor:
        out, lse = [], []
        for row_logits, row_labels in zip(logits, labels):
            row = row_logits.to(dtype)  # [T, V]: only one sequence upcast at a time
            lse.append(torch.logsumexp(row, dim=-1))
            out.append(row.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1) - lse[-1])
        ctx.save_for_backward(logits, labels, torch.stack(lse))
        ctx.dtype = dtype
        return torch.stack(out)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None]:
        logits, labels, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for n in range(logits.shape[0]):
            g = grad_out[n].unsqueeze(-1)  # [T, 1]
            row_grad = -torch.exp(logits[n].to(ctx.dtype) - lse[n].unsqueeze(-1)) * g
            grad[n] = row_grad.scatter_add_(-1, labels[n].unsqueeze(-1), g).to(logits.dtype)
        return grad, None, None


def sequence_logps(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of response-token log-probs, log pi(y|x), and the number of scored tokens.

    ``logits[:, t]`` predicts ``input_ids[:, t + 1]``; a token is scored iff its ``loss_mask`` is 1
    (prompt and padding are 0). Scored as ``logit[label] - logsumexp(logits)`` in float32 (float64
    stays float64), one sequence at a time: neither a log-softmax nor a float32 copy of the whole
    ``[N, T, V]`` tensor is materialised or kept for backward.

    Args:
        logits: ``[N, T, V]`` model outputs, any float dtype (bf16 is fine).
        input_ids: ``[N, T]`` token ids; ids at unscored positions may be anything (e.g. -100).
        loss_mask: ``[N, T]`` bool/0-1, 1 on response tokens to score.

    Returns:
        ``(logps, token_counts)``, both ``[N]`` in float32 (float64 for float64 logits).
    """
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape or input_ids.shape != loss_mask.shape:
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)} [N,T,V], input_ids "
                         f"{tuple(input_ids.shape)} and loss_mask {tuple(loss_mask.shape)} [N,T]")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    mask = loss_mask[:, 1:].bool()
    labels = torch.where(mask, input_ids[:, 1:], torch.zeros_like(input_ids[:, 1:]))
    token_logps = _LabelLogProb.apply(logits[:, :-1], labels, dtype)  # [N, T-1]
    token_logps = torch.where(mask, token_logps, torch.zeros((), dtype=dtype, device=logits.device))
    return token_logps.sum(-1), mask.sum(-1).to(dtype)


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO (Rafailov et al., 2023), with conservative label smoothing l.

    ``loss = -(1 - l) log sigma(beta Delta) - l log sigma(-beta Delta)``.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]``.
        beta: KL strength. label_smoothing: probability l that the label is flipped.

    Returns:
        ``[B]`` per-example losses.
    """
    logits = beta * ((policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps))
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def safedpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                 ref_rejected_logps: Tensor, safety_gap: Tensor, *, beta: float, delta: float) -> Tensor:
    """SafeDPO (Kim et al., ICLR 2026): DPO with a fixed margin on safe-over-unsafe pairs.

    ``loss = -log sigma(beta Delta - g Delta_margin)``, g = ``safety_gap`` in {0, 1}.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]``.
        safety_gap: ``[B]`` bool/0-1, 1 iff chosen is safe and rejected unsafe.
        beta: KL strength. delta: the fixed safety margin Delta_margin (paper default 10).

    Returns:
        ``[B]`` per-example losses.
    """
    logits = beta * ((policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps))
    return -F.logsigmoid(logits - safety_gap.to(logits.dtype) * delta)


def _masked_sum(mask: Tensor, lambdas: Tensor) -> Tensor:
    return (mask.to(lambdas.dtype) * lambdas).sum(-1)


def _masked_mean(mask: Tensor, lambdas: Tensor) -> Tensor:
    return _masked_sum(mask, lambdas) / mask.sum(-1).clamp(min=1).to(lambdas.dtype)


def _masked_max(mask: Tensor, lambdas: Tensor) -> Tensor:
    best = torch.where(mask, lambdas, torch.full_like(lambdas, float("-inf"))).amax(-1)
    return torch.where(mask.any(-1), best, torch.zeros_like(best))


#: ``agg -> (mask [B,K] bool, lambdas [K]) -> [B]``; "binding" is a sum over a pre-filtered mask.
_AGGREGATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "sum": _masked_sum, "mean": _masked_mean, "max": _masked_max, "binding": _masked_sum,
}


def category_margin(category_mask: Tensor, lambdas: Tensor, agg: str, binding: Tensor | None = None) -> Tensor:
    """Cat-DPO margin m(C) = agg_{k in C} lambda_k (arXiv 2604.17299; METHOD.md section 3, derived).

    ``sum`` is what the Lagrangian gives; ``mean`` and ``max`` are alternatives; ``binding`` sums
    lambda_k over k in C whose violation rate exceeds epsilon_k (``binding=None``: all binding).
    A pair with an empty category set gets margin 0 under every ``agg``. lambda is detached.

    Args:
        category_mask: ``[B, K]`` bool/0-1 category sets C. lambdas: ``[K]`` float.
        agg: one of ``sum | mean | max | binding``. binding: optional ``[K]`` bool.

    Returns:
        ``[B]`` margins in ``lambdas``' dtype.
    """
    if agg not in _AGGREGATORS:
        raise ValueError(f"unknown agg {agg!r}; valid: {sorted(_AGGREGATORS)}")
    if category_mask.dim() != 2 or lambdas.shape != category_mask.shape[1:]:
        raise ValueError(f"category_mask {tuple(category_mask.shape)} must be [B, K] and lambdas "
                         f"{tuple(lambdas.shape)} must be [K]")
    mask = category_mask.bool()
    lam = lambdas.detach().to(mask.device)
    if agg == "binding" and binding is not None:
        mask = mask & binding.to(mask.device).bool()
    return _AGGREGATORS[agg](mask, lam)


def catdpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                ref_rejected_logps: Tensor, safety_gap: Tensor, category_mask: Tensor, lambdas: Tensor, *,
                beta: float, agg: str = "sum", binding: Tensor | None = None) -> Tensor:
    """Cat-DPO (arXiv 2604.17299): SafeDPO with a per-category adaptive margin (derived form).

    ``loss = -log sigma(beta Delta - g m(C))``, m(C) from :func:`category_margin`. lambda is a
    constant here (detached): it moves only by the dual update in :mod:`catdpo_ray.dual`.
    With ``agg="max"``, single-category pairs and lambda_k = Delta_margin for all k this equals
    :func:`safedpo_loss`.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]``.
        safety_gap: ``[B]`` bool/0-1. category_mask: ``[B, K]`` bool/0-1. lambdas: ``[K]``.
        beta: KL strength. agg: margin aggregation. binding: optional ``[K]`` bool (agg="binding").

    Returns:
        ``[B]`` per-example losses.
    """
    logits = beta * ((policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps))
    margin = category_margin(category_mask, lambdas, agg, binding).to(logits.device, logits.dtype)
    return -F.logsigmoid(logits - safety_gap.to(logits.dtype) * margin)


def ipo_loss(policy_chosen_mean: Tensor, policy_rejected_mean: Tensor, ref_chosen_mean: Tensor,
             ref_rejected_mean: Tensor, *, beta: float) -> Tensor:
    """IPO (Azar et al., 2024) on per-token mean log-probs.

    ``loss = (Delta_mean - 1 / (2 beta))^2``, Delta_mean built from per-token means.

    Args:
        policy_chosen_mean, policy_rejected_mean, ref_chosen_mean, ref_rejected_mean: ``[B]``.
        beta: regularisation strength (the paper's tau).

    Returns:
        ``[B]`` per-example losses.
    """
    delta_mean = (policy_chosen_mean - ref_chosen_mean) - (policy_rejected_mean - ref_rejected_mean)
    return (delta_mean - 1.0 / (2.0 * beta)) ** 2


def simpo_loss(policy_chosen_mean: Tensor, policy_rejected_mean: Tensor, *, beta: float, gamma: float) -> Tensor:
    """SimPO (Meng et al., 2024): reference-free, length-normalised, with target margin gamma.

    ``loss = -log sigma(beta mean log pi(y_w) - beta mean log pi(y_l) - gamma)``.

    Args:
        policy_chosen_mean, policy_rejected_mean: ``[B]`` per-token mean log-probs.
        beta: reward scale. gamma: target reward margin.

    Returns:
        ``[B]`` per-example losses.
    """
    return -F.logsigmoid(beta * policy_chosen_mean - beta * policy_rejected_mean - gamma)


def mutual_information(logp_with_prompt_sum: Tensor, logp_without_prompt_sum: Tensor, token_count: Tensor) -> Tensor:
    """Per-token pointwise mutual information between prompt and response (B-DPO, arXiv 2026).

    ``I(x; y) = (log pi_ref(y | x) - log pi_ref(y)) / |y|``; the second term is the response scored
    without its prompt. An approximation: B-DPO's exact formula was not recoverable (METHOD.md 5).
    ``token_count`` is clamped to >= 1 so an empty response gives 0, not NaN.

    Args:
        logp_with_prompt_sum, logp_without_prompt_sum, token_count: same shape, e.g. ``[B]``.

    Returns:
        Tensor of that shape.
    """
    return (logp_with_prompt_sum - logp_without_prompt_sum) / token_count.clamp(min=1)


def bdpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
              ref_rejected_logps: Tensor, mi_chosen: Tensor, mi_rejected: Tensor, *, beta: float,
              tau: float) -> Tensor:
    """B-DPO ("Balanced DPO", arXiv 2026), the derived template of METHOD.md section 5.

    ``(w_w, w_l) = 2 softmax(-[I_w, I_l] / tau)``, ``s = 2 / (w_w + w_l)``,
    ``loss = -s log sigma(beta (w_w r_w - w_l r_l))`` with ``r = log pi_theta - log pi_ref`` (sums).
    The better-comprehended response (higher I) is down-weighted. MI inputs are constants
    (detached). An approximation: the paper's exact formula was not recoverable.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]``.
        mi_chosen, mi_rejected: ``[B]`` mutual information I_w, I_l. beta: KL strength. tau: temperature.

    Returns:
        ``[B]`` per-example losses.
    """
    mi = torch.stack([mi_chosen, mi_rejected], dim=-1).detach().to(policy_chosen_logps)
    weights = 2.0 * torch.softmax(-mi / tau, dim=-1)  # [B, 2]
    scale = 2.0 / weights.sum(-1)
    logits = beta * (weights[:, 0] * (policy_chosen_logps - ref_chosen_logps)
                     - weights[:, 1] * (policy_rejected_logps - ref_rejected_logps))
    return -scale * F.logsigmoid(logits)


@dataclass(frozen=True)
class LossParams:
    """Scalar hyperparameters of every loss (mirrors ``config.LossConfig`` + ``DualConfig.agg``)."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    delta: float = 10.0
    simpo_gamma: float = 0.5
    bdpo_tau: float = 1.0
    agg: str = "sum"


@dataclass
class PreferenceBatch:
    """Per-example inputs of one (micro-)batch; every tensor is ``[B]`` unless noted.

    ``*_logps`` are sums over response tokens, ``*_tokens`` the token counts (means = sum / count).
    Optional fields are needed only by some losses; :func:`compute_loss` names a missing one.
    """

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    ref_chosen_logps: Tensor | None = None
    ref_rejected_logps: Tensor | None = None
    safety_gap: Tensor | None = None
    category_mask: Tensor | None = None  #: ``[B, K]`` bool/0-1
    lambdas: Tensor | None = None  #: ``[K]``
    binding: Tensor | None = None  #: ``[K]`` bool
    mi_chosen: Tensor | None = None
    mi_rejected: Tensor | None = None


@dataclass
class LossOutput:
    """``losses`` ``[B]`` (differentiable) and detached implicit rewards ``[B]`` for logging.

    Rewards are ``beta (log pi_theta - log pi_ref)`` on sums; for SimPO ``beta * mean log pi_theta``.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def _need(batch: PreferenceBatch, user: str, *fields: str) -> list[Tensor]:
    missing = [f for f in fields if getattr(batch, f) is None]
    if missing:
        raise ValueError(f"{user} needs PreferenceBatch.{' and .'.join(missing)}, which is None")
    return [getattr(batch, f) for f in fields]


def _sums(batch: PreferenceBatch, user: str) -> list[Tensor]:
    rc, rr = _need(batch, user, "ref_chosen_logps", "ref_rejected_logps")
    return [batch.policy_chosen_logps, batch.policy_rejected_logps, rc, rr]


def _means(batch: PreferenceBatch, sums: list[Tensor]) -> list[Tensor]:
    chosen, rejected = batch.chosen_tokens.clamp(min=1), batch.rejected_tokens.clamp(min=1)
    return [s / n for s, n in zip(sums, [chosen, rejected, chosen, rejected])]


def _output(losses: Tensor, sums: list[Tensor], beta: float) -> LossOutput:
    pc, pr, rc, rr = sums
    return LossOutput(losses, (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach())


def _dpo(b: PreferenceBatch, p: LossParams) -> LossOutput:
    s = _sums(b, "loss 'dpo'")
    return _output(dpo_loss(*s, beta=p.beta, label_smoothing=p.label_smoothing), s, p.beta)


def _ipo(b: PreferenceBatch, p: LossParams) -> LossOutput:
    s = _sums(b, "loss 'ipo'")
    return _output(ipo_loss(*_means(b, s), beta=p.beta), s, p.beta)


def _simpo(b: PreferenceBatch, p: LossParams) -> LossOutput:
    mean_w, mean_l = _means(b, [b.policy_chosen_logps, b.policy_rejected_logps])
    losses = simpo_loss(mean_w, mean_l, beta=p.beta, gamma=p.simpo_gamma)
    return LossOutput(losses, (p.beta * mean_w).detach(), (p.beta * mean_l).detach())


def _safedpo(b: PreferenceBatch, p: LossParams) -> LossOutput:
    s = _sums(b, "loss 'safedpo'")
    (gap,) = _need(b, "loss 'safedpo'", "safety_gap")
    return _output(safedpo_loss(*s, gap, beta=p.beta, delta=p.delta), s, p.beta)


def _catdpo(b: PreferenceBatch, p: LossParams) -> LossOutput:
    s = _sums(b, "loss 'catdpo'")
    gap, mask, lam = _need(b, "loss 'catdpo'", "safety_gap", "category_mask", "lambdas")
    return _output(catdpo_loss(*s, gap, mask, lam, beta=p.beta, agg=p.agg, binding=b.binding), s, p.beta)


def _bdpo(b: PreferenceBatch, p: LossParams) -> LossOutput:
    s = _sums(b, "loss 'bdpo'")
    mi_w, mi_l = _need(b, "loss 'bdpo'", "mi_chosen", "mi_rejected")
    return _output(bdpo_loss(*s, mi_w, mi_l, beta=p.beta, tau=p.bdpo_tau), s, p.beta)


#: Config name -> uniform adapter. A new loss: one function above, one entry here, one test.
LOSSES: dict[str, Callable[[PreferenceBatch, LossParams], LossOutput]] = {
    "dpo": _dpo, "ipo": _ipo, "simpo": _simpo, "safedpo": _safedpo, "catdpo": _catdpo, "bdpo": _bdpo,
}
#: Whether a loss reads reference log-probs (the loop skips the reference pass when False).
NEEDS_REFERENCE: dict[str, bool] = {name: name != "simpo" for name in LOSSES}


def compute_loss(name: str, batch: PreferenceBatch, params: LossParams) -> LossOutput:
    """Per-example losses and rewards of loss ``name`` (a key of :data:`LOSSES`).

    Raises:
        ValueError: unknown ``name`` (the message lists valid names), or a field it needs is None.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {sorted(LOSSES)}")
    return LOSSES[name](batch, params)
