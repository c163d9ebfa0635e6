"""Tests of catdpo_ray.losses: hand-computed values, reference parity, gradients, exact statistics.

Values are chosen so beta * logit lands on 0, ln 3 or -ln 3, where -log sigma has closed forms:
-log sigma(0) = ln 2, -log sigma(ln 3) = ln(1 + 1/3) = ln(4/3), -log sigma(-ln 3) = ln(1 + 3) = ln 4.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from catdpo_ray.dual import DualState
from catdpo_ray.losses import (
    LOSSES,
    NEEDS_REFERENCE,
    LossParams,
    PreferenceBatch,
    bdpo_loss,
    catdpo_loss,
    category_margin,
    compute_loss,
    dpo_loss,
    ipo_loss,
    mutual_information,
    safedpo_loss,
    sequence_logps,
    simpo_loss,
)
from catdpo_ray.violation import violation_stats

LN2, LN3, LN4, LN43 = math.log(2), math.log(3), math.log(4), math.log(4 / 3)


def t(*values: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype))


# --------------------------------------------------------------------------- sequence_logps


def naive_sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor,
                         loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token reference in float64: sum_t mask[t] * log_softmax(logits[t-1])[ids[t]]."""
    sums, counts = [], []
    for n in range(input_ids.shape[0]):
        total, count = 0.0, 0
        for pos in range(1, input_ids.shape[1]):
            if loss_mask[n, pos]:
                row = logits[n, pos - 1].double()
                total += (row[input_ids[n, pos]] - torch.log(torch.exp(row).sum())).item()
                count += 1
        sums.append(total)
        counts.append(count)
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64)


def test_sequence_logps_matches_naive_loop() -> None:
    """Two sequences of length 6 over V=7: prompt (mask 0), response (mask 1), padding (mask 0, id -100)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 7)
    input_ids = torch.tensor([[1, 2, 3, 4, 5, 6], [0, 1, 2, 3, -100, -100]])
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]])
    logps, counts = sequence_logps(logits, input_ids, loss_mask)
    ref_logps, ref_counts = naive_sequence_logps(logits, torch.where(loss_mask.bool(), input_ids, 0), loss_mask)
    assert logps.dtype == torch.float32 and counts.dtype == torch.float32
    torch.testing.assert_close(logps.double(), ref_logps, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(counts.double(), ref_counts)
    close(counts, [4.0, 3.0])


def test_sequence_logps_uniform_logits_by_hand() -> None:
    """All-zero logits over V=4: every scored token has log-prob ln(1/4); 2 and 1 tokens scored."""
    logits = torch.zeros(2, 3, 4)
    input_ids = torch.tensor([[0, 1, 2], [3, 3, 3]])
    loss_mask = torch.tensor([[0, 1, 1], [1, 0, 1]])  # position 0 is never scored (nothing predicts it)
    logps, counts = sequence_logps(logits, input_ids, loss_mask)
    close(logps, [-2 * LN4, -LN4])
    close(counts, [2.0, 1.0])


def test_sequence_logps_bf16_computes_in_float32_and_gradients_flow() -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, 5, 11).to(torch.bfloat16).requires_grad_(True)
    input_ids = torch.randint(0, 11, (3, 5))
    loss_mask = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]])
    logps, _ = sequence_logps(logits, input_ids, loss_mask)
    assert logps.dtype == torch.float32
    ref, _ = naive_sequence_logps(logits.detach().float(), input_ids, loss_mask)
    torch.testing.assert_close(logps.double(), ref, rtol=1e-5, atol=1e-4)
    logps.sum().backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16


def test_sequence_logps_bf16_gradient_matches_float32_autograd() -> None:
    """The hand-written backward equals autograd through a float32 log_softmax of the same bf16 values."""
    torch.manual_seed(5)
    logits = torch.randn(2, 6, 9).to(torch.bfloat16).requires_grad_(True)
    input_ids = torch.randint(0, 9, (2, 6))
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    weights = torch.tensor([0.7, -1.3])
    (sequence_logps(logits, input_ids, loss_mask)[0] * weights).sum().backward()
    reference = logits.detach().float().requires_grad_(True)
    token = torch.log_softmax(reference[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    ((token * loss_mask[:, 1:]).sum(-1) * weights).sum().backward()
    torch.testing.assert_close(logits.grad.float(), reference.grad.to(torch.bfloat16).float())


def test_sequence_logps_keeps_no_float32_copy_of_bf16_logits_for_backward() -> None:
    """Memory: tensors saved for backward hold at most the bf16 logits, never an [N, T, V] float32 copy."""
    logits = torch.randn(2, 8, 16).to(torch.bfloat16).requires_grad_(True)
    saved: list[torch.Tensor] = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        sequence_logps(logits, torch.randint(0, 16, (2, 8)), torch.ones(2, 8))
    assert not [x for x in saved if x.dtype == torch.float32 and x.numel() >= 2 * 7 * 16]


def test_sequence_logps_gradient_matches_finite_differences() -> None:
    torch.manual_seed(2)
    logits = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    input_ids = torch.randint(0, 5, (2, 4))
    loss_mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert torch.autograd.gradcheck(lambda x: sequence_logps(x, input_ids, loss_mask)[0], (logits,))


# --------------------------------------------------------------------------- hand-computed losses


def test_dpo_loss_by_hand() -> None:
    """beta = 1; Delta = (pc - rc) - (pr - rr):
    pair 0: (-1 - -1) - (-2 - -2) = 0       -> ln 2
    pair 1: (ln3 - 0) - (0 - 0) = ln 3       -> ln(4/3)
    pair 2: (0 - 0) - (ln3 - 0) = -ln 3      -> ln 4
    """
    pc, pr, rc, rr = t(-1, LN3, 0), t(-2, 0, LN3), t(-1, 0, 0), t(-2, 0, 0)
    close(dpo_loss(pc, pr, rc, rr, beta=1.0), [LN2, LN43, LN4])


def test_dpo_label_smoothing_by_hand() -> None:
    """beta = 0.5, Delta = 2 ln 3 (beta Delta = ln 3), l = 0.25:
    0.75 * -log sigma(ln 3) + 0.25 * -log sigma(-ln 3) = 0.75 ln(4/3) + 0.25 ln 4.
    """
    out = dpo_loss(t(2 * LN3), t(0.0), t(0.0), t(0.0), beta=0.5, label_smoothing=0.25)
    close(out, [0.75 * LN43 + 0.25 * LN4])


def test_safedpo_loss_by_hand() -> None:
    """beta = 1, margin Delta_m = 2; logit = Delta - g * 2:
    pair 0: g=1, Delta = 2         -> 0      -> ln 2
    pair 1: g=0, Delta = ln 3      -> ln 3   -> ln(4/3)
    pair 2: g=1, Delta = 2 - ln 3  -> -ln 3  -> ln 4
    """
    pc, zeros = t(2, LN3, 2 - LN3), t(0, 0, 0)
    gap = torch.tensor([True, False, True])
    close(safedpo_loss(pc, zeros, zeros, zeros, gap, beta=1.0, delta=2.0), [LN2, LN43, LN4])


def test_category_margin_every_agg_by_hand() -> None:
    """lambda = (1, 2, 4); C = {0,1}, {2}, {} (empty), {0,1,2}; binding = (T, F, T):
    sum     = 1+2=3, 4, 0, 7
    mean    = 3/2, 4, 0, 7/3
    max     = 2, 4, 0, 4
    binding = 1 (2 not binding), 4, 0, 1+4=5; binding=None -> all binding -> equals sum.
    """
    mask = torch.tensor([[1, 1, 0], [0, 0, 1], [0, 0, 0], [1, 1, 1]])
    lam = t(1, 2, 4)
    close(category_margin(mask, lam, "sum"), [3, 4, 0, 7])
    close(category_margin(mask.bool(), lam, "mean"), [1.5, 4, 0, 7 / 3])
    close(category_margin(mask, lam, "max"), [2, 4, 0, 4])
    close(category_margin(mask, lam, "binding", torch.tensor([True, False, True])), [1, 4, 0, 5])
    close(category_margin(mask, lam, "binding", None), [3, 4, 0, 7])
    with pytest.raises(ValueError, match="unknown agg"):
        category_margin(mask, lam, "median")
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        category_margin(mask, t(1, 2), "sum")


def test_category_margin_max_with_all_empty_and_negative_lambda() -> None:
    """max over an empty C is 0 (not -inf); over a non-empty C it is the true max even if lambda < 0."""
    mask = torch.tensor([[0, 0], [1, 0]])
    close(category_margin(mask, t(-3, 5), "max"), [0, -3])


@pytest.mark.parametrize("agg", ["sum", "mean", "max", "binding"])
def test_catdpo_loss_by_hand(agg: str) -> None:
    """beta = 1, lambda = (1, 2, 4), binding = (T, T, F):
    pair 0: g=1, C={0,1}, margin sum 3 / mean 1.5 / max 2 / binding 3; Delta = margin -> logit 0 -> ln 2
    pair 1: g=0, C={2}: margin ignored; Delta = ln 3                           -> ln(4/3)
    pair 2: g=1, C={} : margin 0 for every agg; Delta = -ln 3                  -> ln 4
    """
    margin0 = {"sum": 3.0, "mean": 1.5, "max": 2.0, "binding": 3.0}[agg]
    pc, zeros = t(margin0, LN3, -LN3), t(0, 0, 0)
    gap = t(1, 0, 1)
    mask = torch.tensor([[True, True, False], [False, False, True], [False, False, False]])
    out = catdpo_loss(pc, zeros, zeros, zeros, gap, mask, t(1, 2, 4), beta=1.0, agg=agg,
                      binding=torch.tensor([True, True, False]))
    close(out, [LN2, LN43, LN4])


def test_ipo_loss_by_hand() -> None:
    """beta = 0.5 -> 1/(2 beta) = 1; Delta_mean = (1, 3, -1) -> (1-1)^2, (3-1)^2, (-1-1)^2 = 0, 4, 4."""
    zeros = t(0, 0, 0)
    close(ipo_loss(t(1, 3, -1), zeros, zeros, zeros, beta=0.5), [0, 4, 4])


def test_simpo_loss_by_hand() -> None:
    """beta = 2, gamma = 0.5; logit = 2 (m_w - m_l) - 0.5:
    m_w - m_l = 0.25             -> 0      -> ln 2
    m_w - m_l = (ln 3 + 0.5)/2   -> ln 3   -> ln(4/3)
    m_w - m_l = (0.5 - ln 3)/2   -> -ln 3  -> ln 4
    """
    out = simpo_loss(t(0.25, (LN3 + 0.5) / 2, (0.5 - LN3) / 2), t(0, 0, 0), beta=2.0, gamma=0.5)
    close(out, [LN2, LN43, LN4])


def test_bdpo_loss_by_hand() -> None:
    """beta = 1, tau = 1; w = 2 softmax(-[I_w, I_l]); here w_w + w_l = 2 so s = 1.
    pair 0: I_w = I_l = 0      -> w = (1, 1);      r_w = ln 3, r_l = 0      -> logit ln 3  -> ln(4/3)
    pair 1: I_w = ln 3, I_l = 0 -> softmax = (1/3, 1)/(4/3) = (1/4, 3/4) -> w = (1/2, 3/2);
            r_w = 2 ln 3, r_l = 0 -> logit 1/2 * 2 ln 3 = ln 3          -> ln(4/3)
    pair 2: I_w = 0, I_l = ln 3 -> w = (3/2, 1/2); r_w = 0, r_l = 2 ln 3 -> logit -ln 3  -> ln 4
    """
    pc, pr, zeros = t(LN3, 2 * LN3, 0), t(0, 0, 2 * LN3), t(0, 0, 0)
    out = bdpo_loss(pc, pr, zeros, zeros, t(0, LN3, 0), t(0, 0, LN3), beta=1.0, tau=1.0)
    close(out, [LN43, LN43, LN4])


def test_bdpo_tau_sharpens_weights() -> None:
    """tau = 0.5 doubles the MI gap: I = (ln 3 / 2, 0) / 0.5 behaves like (ln 3, 0) -> w = (1/2, 3/2).
    With r_w = 2 ln 3 and r_l = 0 the logit is ln 3 -> ln(4/3)."""
    out = bdpo_loss(t(2 * LN3), t(0.0), t(0.0), t(0.0), t(LN3 / 2), t(0.0), beta=1.0, tau=0.5)
    close(out, [LN43])


def test_mutual_information_by_hand() -> None:
    """(sum_with - sum_without) / count: (-2 - -4)/2 = 1, (-6 - -3)/3 = -1; count 0 -> clamped to 1."""
    close(mutual_information(t(-2, -6, 0), t(-4, -3, 0), t(2, 3, 0)), [1, -1, 0])


# --------------------------------------------------------------------------- parity and gradients


def test_catdpo_equals_safedpo_with_frozen_lambda() -> None:
    """METHOD.md section 3 check: eta = 0, lambda_init = Delta, agg = max, single-category pairs."""
    torch.manual_seed(3)
    b, k, delta = 16, 5, 10.0
    pc, pr, rc, rr = (torch.randn(b) * 20 - 50 for _ in range(4))
    gap = torch.randint(0, 2, (b,))
    mask = torch.nn.functional.one_hot(torch.randint(0, k, (b,)), k).bool()
    expected = safedpo_loss(pc, pr, rc, rr, gap, beta=0.1, delta=delta)
    dual = DualState(k, eta=0.0, epsilon=0.02, lambda_init=delta)
    for step in range(3):
        lam = dual.update(torch.rand(k) * 4, torch.full((k,), 4.0)) if step else dual.lambdas
        assert torch.equal(lam, torch.full((k,), delta, dtype=torch.float64))
        actual = catdpo_loss(pc, pr, rc, rr, gap, mask, lam, beta=0.1, agg="max")
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_lambda_gets_no_gradient() -> None:
    pc = t(-1.0, -2.0).requires_grad_(True)
    lam = t(3.0, 5.0).requires_grad_(True)
    loss = catdpo_loss(pc, t(-2, -1), t(-1, -1), t(-1, -1), t(1, 1), torch.tensor([[1, 0], [1, 1]]), lam,
                       beta=0.1, agg="sum")
    loss.sum().backward()
    assert lam.grad is None
    assert pc.grad is not None


def _policy_fns() -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Each loss as a function of (policy chosen, policy rejected) with fixed other inputs."""
    rc, rr = t(-3.0, -1.0, -2.0), t(-2.5, -2.0, -1.0)
    gap, mask, lam = t(1, 0, 1), torch.tensor([[1, 1, 0], [0, 1, 0], [1, 0, 1]]), t(0.5, 1.0, 2.0)
    return {
        "dpo": lambda a, b: dpo_loss(a, b, rc, rr, beta=0.3, label_smoothing=0.1),
        "safedpo": lambda a, b: safedpo_loss(a, b, rc, rr, gap, beta=0.3, delta=1.5),
        **{f"catdpo-{agg}": (lambda a, b, agg=agg: catdpo_loss(a, b, rc, rr, gap, mask, lam, beta=0.3, agg=agg))
           for agg in ("sum", "mean", "max", "binding")},
        "ipo": lambda a, b: ipo_loss(a, b, rc, rr, beta=0.3),
        "simpo": lambda a, b: simpo_loss(a, b, beta=2.0, gamma=0.5),
        "bdpo": lambda a, b: bdpo_loss(a, b, rc, rr, t(0.3, -0.2, 1.0), t(0.1, 0.4, -0.5), beta=0.3, tau=0.7),
    }


@pytest.mark.parametrize("name", list(_policy_fns()))
def test_loss_gradients_match_finite_differences(name: str) -> None:
    fn = _policy_fns()[name]
    chosen = t(-2.0, -1.5, -0.5).requires_grad_(True)
    rejected = t(-1.0, -3.0, -2.5).requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (chosen, rejected))


# --------------------------------------------------------------------------- dispatch


def _batch(**overrides: torch.Tensor | None) -> PreferenceBatch:
    fields = dict(
        policy_chosen_logps=t(-4.0, -6.0, -3.0), policy_rejected_logps=t(-5.0, -4.0, -9.0),
        chosen_tokens=t(2, 3, 1), rejected_tokens=t(5, 2, 3),
        ref_chosen_logps=t(-5.0, -5.0, -3.0), ref_rejected_logps=t(-5.0, -5.0, -8.0),
        safety_gap=t(1, 1, 0), category_mask=torch.tensor([[1, 0], [1, 1], [0, 1]]),
        lambdas=t(2.0, 3.0), binding=torch.tensor([True, False]),
        mi_chosen=t(0.2, 0.1, 0.0), mi_rejected=t(0.0, 0.3, 0.1),
    )
    fields.update(overrides)
    return PreferenceBatch(**fields)


def test_compute_loss_dispatches_to_each_loss_and_rewards() -> None:
    """Adapters pass sums (means = sum / tokens for ipo/simpo) and the params to the pure functions."""
    b, p = _batch(), LossParams(beta=0.2, label_smoothing=0.1, delta=3.0, simpo_gamma=0.4, bdpo_tau=2.0,
                                agg="binding")
    s = (b.policy_chosen_logps, b.policy_rejected_logps, b.ref_chosen_logps, b.ref_rejected_logps)
    ct, rt = b.chosen_tokens, b.rejected_tokens
    means = (s[0] / ct, s[1] / rt, s[2] / ct, s[3] / rt)
    expected = {
        "dpo": dpo_loss(*s, beta=0.2, label_smoothing=0.1),
        "ipo": ipo_loss(*means, beta=0.2),
        "simpo": simpo_loss(means[0], means[1], beta=0.2, gamma=0.4),
        "safedpo": safedpo_loss(*s, b.safety_gap, beta=0.2, delta=3.0),
        "catdpo": catdpo_loss(*s, b.safety_gap, b.category_mask, b.lambdas, beta=0.2, agg="binding",
                              binding=b.binding),
        "bdpo": bdpo_loss(*s, b.mi_chosen, b.mi_rejected, beta=0.2, tau=2.0),
    }
    assert set(LOSSES) == set(expected)
    for name, want in expected.items():
        out = compute_loss(name, b, p)
        torch.testing.assert_close(out.losses, want)
        reward_w, reward_l = ((0.2 * means[0], 0.2 * means[1]) if name == "simpo"
                              else (0.2 * (s[0] - s[2]), 0.2 * (s[1] - s[3])))
        torch.testing.assert_close(out.chosen_rewards, reward_w)
        torch.testing.assert_close(out.rejected_rewards, reward_l)
    assert NEEDS_REFERENCE == {"dpo": True, "ipo": True, "simpo": False, "safedpo": True, "catdpo": True,
                               "bdpo": True}


def test_compute_loss_ipo_means_by_hand() -> None:
    """beta = 0.5: means pc -4/2 = -2, rc -5/2; pr -5/5 = -1, rr -5/5 = -1 -> Delta_mean = 0.5 -> (0.5 - 1)^2."""
    out = compute_loss("ipo", _batch(), LossParams(beta=0.5))
    assert out.losses[0].item() == pytest.approx(0.25)


def test_compute_loss_rewards_are_detached() -> None:
    b = _batch(policy_chosen_logps=t(-4.0, -6.0, -3.0).requires_grad_(True))
    out = compute_loss("catdpo", b, LossParams())
    assert out.losses.requires_grad and not out.chosen_rewards.requires_grad


def test_compute_loss_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"unknown loss 'orpo'.*catdpo"):
        compute_loss("orpo", _batch(), LossParams())
    with pytest.raises(ValueError, match=r"'catdpo' needs PreferenceBatch.lambdas"):
        compute_loss("catdpo", _batch(lambdas=None), LossParams())
    with pytest.raises(ValueError, match=r"ref_chosen_logps and .ref_rejected_logps"):
        compute_loss("dpo", _batch(ref_chosen_logps=None, ref_rejected_logps=None), LossParams())
    compute_loss("simpo", _batch(ref_chosen_logps=None, ref_rejected_logps=None), LossParams())


# --------------------------------------------------------------------------- violation statistics


def _stats_batch() -> PreferenceBatch:
    """beta = 1. Delta = (pc - rc) - (pr - rr) with zero reference: 0, ln 3, -ln 3, 5.
    gap = (1, 1, 1, 0): pair 3 never counts. C = {0}, {0,1}, {1}, {0,1}.
    """
    return PreferenceBatch(
        policy_chosen_logps=t(-2.0, LN3 - 3.0, -6.0, 5.0), policy_rejected_logps=t(-2.0, -3.0, LN3 - 6.0, 0.0),
        chosen_tokens=t(1, 2, 4, 1), rejected_tokens=t(2, 1, 2, 1),
        ref_chosen_logps=t(0, 0, 0, 0), ref_rejected_logps=t(0, 0, 0, 0),
        safety_gap=torch.tensor([1, 1, 1, 0]),
        category_mask=torch.tensor([[1, 0], [1, 1], [0, 1], [1, 1]]),
    )


def test_violation_stats_soft_by_hand() -> None:
    """sigma(-Delta): pair 0 sigma(0) = 1/2, pair 1 sigma(-ln 3) = 1/4, pair 2 sigma(ln 3) = 3/4.
    n = (pairs 0,1 ; pairs 1,2) = (2, 2); v = (1/2 + 1/4, 1/4 + 3/4) = (0.75, 1.0)."""
    counts, violations = violation_stats(_stats_batch(), beta=1.0, signal="soft")
    assert counts.dtype == violations.dtype == torch.float64
    close(counts, [2, 2])
    close(violations, [0.75, 1.0])


def test_violation_stats_hard_by_hand() -> None:
    """1[Delta <= 0]: pair 0 (Delta 0) 1, pair 1 (ln 3) 0, pair 2 (-ln 3) 1 -> v = (1 + 0, 0 + 1) = (1, 1)."""
    counts, violations = violation_stats(_stats_batch(), beta=1.0, signal="hard")
    close(counts, [2, 2])
    close(violations, [1, 1])


def test_violation_stats_likelihood_by_hand() -> None:
    """mean chosen vs mean rejected (no reference):
    pair 0: -2/1 = -2 vs -2/2 = -1 -> rejected >= chosen -> 1
    pair 1: (ln3-3)/2 = -0.95 vs -3/1 = -3 -> 0
    pair 2: -6/4 = -1.5 vs (ln3-6)/2 = -2.45 -> 0
    v = (1 + 0, 0 + 0) = (1, 0)."""
    batch = _stats_batch()
    batch.ref_chosen_logps = batch.ref_rejected_logps = None
    counts, violations = violation_stats(batch, beta=1.0, signal="likelihood")
    close(counts, [2, 2])
    close(violations, [1, 0])


def _slice(batch: PreferenceBatch, rows: slice) -> PreferenceBatch:
    per_example = {name: getattr(batch, name) for name in batch.__dataclass_fields__}
    return PreferenceBatch(**{name: (None if v is None else v if name in ("lambdas", "binding") else v[rows])
                              for name, v in per_example.items()})


@pytest.mark.parametrize("signal", ["soft", "hard", "likelihood"])
def test_violation_stats_halves_sum_exactly_to_whole(signal: str) -> None:
    """Exactness for the all-reduce: any split, summed in any order, equals the whole batch bit for bit."""
    torch.manual_seed(4)
    b, k = 37, 6
    batch = PreferenceBatch(
        policy_chosen_logps=torch.randn(b) * 10 - 40, policy_rejected_logps=torch.randn(b) * 10 - 40,
        chosen_tokens=torch.randint(1, 30, (b,)).float(), rejected_tokens=torch.randint(1, 30, (b,)).float(),
        ref_chosen_logps=torch.randn(b) * 10 - 40, ref_rejected_logps=torch.randn(b) * 10 - 40,
        safety_gap=torch.randint(0, 2, (b,)), category_mask=torch.rand(b, k) < 0.4,
    )
    whole = violation_stats(batch, beta=0.1, signal=signal)
    for cuts in ([0, 18, 37], [0, 5, 11, 30, 37], [0, 1, 2, 36, 37]):
        parts = [violation_stats(_slice(batch, slice(a, z)), beta=0.1, signal=signal)
                 for a, z in zip(cuts[:-1], cuts[1:])]
        for order in (parts, parts[::-1]):
            counts, violations = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
            for c, v in order:
                counts, violations = counts + c, violations + v
            assert torch.equal(counts, whole[0]) and torch.equal(violations, whole[1])


def test_violation_stats_soft_needs_reference_and_known_signal() -> None:
    batch = _stats_batch()
    batch.ref_chosen_logps = None
    with pytest.raises(ValueError, match="'soft' needs PreferenceBatch.ref_chosen_logps"):
        violation_stats(batch, beta=1.0, signal="soft")
    with pytest.raises(ValueError, match="unknown violation signal"):
        violation_stats(batch, beta=1.0, signal="judge")


def test_violation_stats_carries_no_gradient() -> None:
    batch = _stats_batch()
    batch.policy_chosen_logps.requires_grad_(True)
    counts, violations = violation_stats(batch, beta=1.0, signal="soft")
    assert not violations.requires_grad and not counts.requires_grad
