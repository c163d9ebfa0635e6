"""Tests of catdpo_ray.dual.DualState: hand-computed lambda sequences, windowing, exact resume.

Rule under test (METHOD.md section 4): for each k with n_k > 0,
lambda_k <- clip(lambda_k + eta (v_k / n_k - epsilon_k), 0, lambda_max); absent k keep lambda_k.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from catdpo_ray.dual import DualState


def close(actual: torch.Tensor, expected: list[float]) -> None:
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64))


def test_docstring_worked_example() -> None:
    """Step 1: rates (1/4, 0/2) -> 0.5 (0.25 - 0.02) = 0.115; 0.5 (0 - 0.02) = -0.01 -> clipped 0.
    Step 2: category 0 absent keeps 0.115; rate_1 = 2.5 / 5 = 0.5 -> 0.5 (0.5 - 0.02) = 0.24."""
    dual = DualState(2, eta=0.5, epsilon=0.02)
    close(dual.update([1.0, 0.0], [4, 2]), [0.115, 0.0])
    close(dual.update([0.0, 2.5], [0, 5]), [0.115, 0.24])
    assert dual.num_updates == dual.num_calls == 2


def test_tightening_sequence() -> None:
    """eta = 1, epsilon = 0.1, rate 0.6 every step: lambda += 0.5 each step -> 0.5, 1.0, 1.5."""
    dual = DualState(1, eta=1.0, epsilon=0.1)
    assert [dual.update([3.0], [5])[0].item() for _ in range(3)] == pytest.approx([0.5, 1.0, 1.5])


def test_relaxing_and_clipping_at_zero() -> None:
    """eta = 2, epsilon = 0.25, lambda_init = 1, rate 0: lambda -= 0.5 -> 0.5, 0.0, then stays 0 (clip)."""
    dual = DualState(1, eta=2.0, epsilon=0.25, lambda_init=1.0)
    assert [dual.update([0.0], [4])[0].item() for _ in range(3)] == pytest.approx([0.5, 0.0, 0.0])


def test_clipping_at_lambda_max() -> None:
    """eta = 10, epsilon = 0, rate 1, lambda_max = 25: 10, 20, then 30 clipped to 25, stays 25."""
    dual = DualState(1, eta=10.0, epsilon=0.0, lambda_max=25.0)
    assert [dual.update([2.0], [2])[0].item() for _ in range(4)] == [10.0, 20.0, 25.0, 25.0]


def test_absent_categories_keep_lambda_and_rates_are_nan() -> None:
    """K = 3, lambda_init = (1, 2, 3), eta = 1, epsilon = 0: only category 1 observed (rate 0.5) -> 2.5."""
    dual = DualState(3, eta=1.0, epsilon=0.0, lambda_init=[1.0, 2.0, 3.0])
    close(dual.update(torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])), [1.0, 2.5, 3.0])
    rates = dual.last_rates
    assert math.isnan(rates[0]) and rates[1] == 0.5 and math.isnan(rates[2])


def test_per_category_epsilon() -> None:
    """epsilon = (0.1, 0.5), eta = 1, both rates 0.3: lambda = (0 + 0.2, clip(0 - 0.2)) = (0.2, 0)."""
    dual = DualState(2, eta=1.0, epsilon=[0.1, 0.5])
    close(dual.update([0.3, 0.3], [1, 1]), [0.2, 0.0])
    assert dual.binding.tolist() == [True, False]


def test_binding_flags() -> None:
    """Never observed -> binding; observed -> rate > epsilon; absent later -> keeps its last flag."""
    dual = DualState(3, eta=1.0, epsilon=0.1)
    assert dual.binding.tolist() == [True, True, True]
    dual.update([0.5, 0.0, 0.0], [1, 1, 0])  # rates 0.5 > 0.1, 0 <= 0.1, absent
    assert dual.binding.tolist() == [True, False, True]
    dual.update([0.0, 0.0, 0.0], [0, 0, 2])  # category 2: rate 0 -> not binding; 0 and 1 absent -> kept
    assert dual.binding.tolist() == [True, False, False]


def test_update_every_two_uses_window_sums() -> None:
    """update_every = 2, eta = 1, epsilon = 0. Call 1: v=1, n=1 (rate 1). Call 2: v=0, n=3 (rate 0).
    Window sum: 1/4 = 0.25 -> lambda 0.25. (An average of per-call rates would give 0.5.)
    Nothing changes after call 1; call 3 starts a fresh window."""
    dual = DualState(1, eta=1.0, epsilon=0.0, update_every=2)
    close(dual.update([1.0], [1]), [0.0])
    assert dual.num_updates == 0 and dual.num_calls == 1
    close(dual.update([0.0], [3]), [0.25])
    assert dual.num_updates == 1 and dual.last_rates.tolist() == [0.25]
    close(dual.update([1.0], [1]), [0.25])
    close(dual.update([1.0], [1]), [1.25])


def _steps(k: int, n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        counts = torch.randint(0, 5, (k,), generator=gen).double()
        out.append((counts * torch.rand(k, generator=gen, dtype=torch.float64), counts))
    return out


def test_state_dict_round_trip_mid_window_equals_uninterrupted() -> None:
    kwargs = dict(eta=0.7, epsilon=[0.02, 0.1, 0.05, 0.3], lambda_init=[0.0, 1.0, 2.0, 0.5], lambda_max=3.0,
                  update_every=3)
    steps = _steps(4, 11, seed=0)
    uninterrupted = DualState(4, **kwargs)
    trajectory = [uninterrupted.update(v, n) for v, n in steps]

    first = DualState(4, **kwargs)
    for v, n in steps[:7]:  # 7 calls: two applied windows + one call into the third
        first.update(v, n)
    state = json.loads(json.dumps(first.state_dict()))  # proves it is JSON-serialisable
    assert state["window_calls"] == 1 and any(state["window_counts"])
    resumed = DualState(4, **kwargs)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == first.state_dict()
    for i, (v, n) in enumerate(steps[7:], start=7):
        assert torch.equal(resumed.update(v, n), trajectory[i])
    assert resumed.state_dict() == uninterrupted.state_dict()
    assert torch.equal(resumed.binding, uninterrupted.binding)
    assert torch.equal(resumed.last_rates.nan_to_num(-1), uninterrupted.last_rates.nan_to_num(-1))


def test_lambdas_is_a_copy() -> None:
    dual = DualState(2, eta=1.0, epsilon=0.0)
    dual.lambdas.add_(5.0)
    close(dual.lambdas, [0.0, 0.0])


def test_frozen_dual_keeps_lambda_init() -> None:
    """eta = 0 reproduces SafeDPO's fixed margin: lambda stays at lambda_init whatever the violations."""
    dual = DualState(3, eta=0.0, epsilon=0.02, lambda_init=10.0)
    for v, n in _steps(3, 5, seed=1):
        close(dual.update(v, n), [10.0, 10.0, 10.0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(eta=0.5, epsilon=[0.1, 0.2]), "epsilon: got 2 values, expected one float or 3"),
        (dict(eta=0.5, epsilon=0.02, lambda_init=[1.0]), "lambda_init: got 1 values"),
        (dict(eta=0.5, epsilon=0.02, lambda_init=200.0), "outside"),
        (dict(eta=-1.0, epsilon=0.02), "eta >= 0"),
        (dict(eta=0.5, epsilon=0.02, update_every=0), "update_every >= 1"),
    ],
)
def test_constructor_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DualState(3, **kwargs)


def test_update_and_load_validation() -> None:
    dual = DualState(2, eta=0.5, epsilon=0.02)
    with pytest.raises(ValueError, match="violations: expected 2"):
        dual.update([1.0, 2.0, 3.0], [1, 1])
    with pytest.raises(ValueError, match="counts: values must be finite and >= 0"):
        dual.update([1.0, 1.0], [1, -1])
    with pytest.raises(ValueError, match="categories"):
        DualState(3, eta=0.5, epsilon=0.02).load_state_dict(dual.state_dict())
    with pytest.raises(ValueError, match="missing"):
        dual.load_state_dict({"lambdas": [0.0, 0.0]})
