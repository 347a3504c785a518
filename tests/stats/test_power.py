"""Tests of the sample-size calculations: closed forms, scipy power functions, Monte-Carlo."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from safeshift.stats import (
    confidence_sequence,
    diff_means,
    diff_proportions,
    fixed_horizon_samples_per_arm,
    proportion_variance,
    sequential_samples_per_arm,
)


def test_fixed_horizon_textbook_example() -> None:
    # Two-sided 5%, 80% power, effect of half a standard deviation: 62.8 per arm
    # (normal approximation; Cohen's t-test table gives 64 after the t correction).
    n = fixed_horizon_samples_per_arm(1.0, 0.5, alpha=0.05, power=0.8, one_sided=False)
    assert n == pytest.approx(62.79, abs=0.01)


@pytest.mark.parametrize("one_sided", [True, False])
@pytest.mark.parametrize(
    ("sigma2", "delta", "alpha", "power"),
    [
        (1.0, 0.1, 0.05, 0.8),
        (0.0475, 0.005, 0.01, 0.9),
        (25.0, -2.0, 0.1, 0.95),
    ],
)
def test_fixed_horizon_attains_power_under_scipy_power_function(
    sigma2: float, delta: float, alpha: float, power: float, one_sided: bool
) -> None:
    n = fixed_horizon_samples_per_arm(sigma2, delta, alpha=alpha, power=power, one_sided=one_sided)
    se = math.sqrt(2 * sigma2 / n)
    shift = abs(delta) / se
    if one_sided:
        achieved = sps.norm.sf(sps.norm.isf(alpha) - shift)
        assert achieved == pytest.approx(power, abs=1e-9)
    else:
        crit = sps.norm.isf(alpha / 2)
        achieved = sps.norm.sf(crit - shift) + sps.norm.cdf(-crit - shift)
        # the far tail adds a negligible amount
        assert power <= achieved <= power + 1e-3


def test_fixed_horizon_scaling() -> None:
    base = fixed_horizon_samples_per_arm(2.0, 0.3)
    assert fixed_horizon_samples_per_arm(8.0, 0.3) == pytest.approx(4 * base)
    assert fixed_horizon_samples_per_arm(2.0, 0.15) == pytest.approx(4 * base)


def test_fixed_horizon_monte_carlo() -> None:
    rng = np.random.default_rng(10)
    sigma2, delta, reps = 4.0, 0.25, 4000
    n = math.ceil(fixed_horizon_samples_per_arm(sigma2, delta, alpha=0.05, power=0.8))
    sd = math.sqrt(sigma2 / n)
    diff = rng.normal(delta, sd, size=reps) - rng.normal(0.0, sd, size=reps)
    rate = float(np.mean(diff / math.sqrt(2 * sigma2 / n) > sps.norm.isf(0.05)))
    assert rate == pytest.approx(0.8, abs=3 * math.sqrt(0.16 / reps) + 0.005)


@pytest.mark.parametrize("one_sided", [True, False])
def test_sequential_needs_more_than_fixed(one_sided: bool) -> None:
    for sigma2, delta, n_star in [(1.0, 0.1, 5000.0), (0.05, 0.01, 20_000.0), (9.0, 1.0, 500.0)]:
        seq = sequential_samples_per_arm(sigma2, delta, n_star=n_star, one_sided=one_sided)
        fixed = fixed_horizon_samples_per_arm(sigma2, delta, one_sided=one_sided)
        assert fixed < seq < 10 * fixed
    # smaller margins need more data
    assert sequential_samples_per_arm(1.0, 0.05, n_star=5000.0) > sequential_samples_per_arm(
        1.0, 0.1, n_star=5000.0
    )


def test_sequential_cost_at_n_star_is_about_1_9x() -> None:
    # STATS.md: two-sided, 80% power, the look at N* needs about 1.9x the fixed n.
    fixed = fixed_horizon_samples_per_arm(1.0, 0.1, one_sided=False)
    n_star = 2 * fixed
    for _ in range(50):  # tune N* to the look itself (units over both arms)
        n_star = 2 * sequential_samples_per_arm(1.0, 0.1, n_star=n_star, one_sided=False)
    seq = sequential_samples_per_arm(1.0, 0.1, n_star=n_star, one_sided=False)
    assert seq / fixed == pytest.approx(1.9, abs=0.05)


def _proven_safe_rate_means(n: int, sigma2: float, delta: float, n_star: float, reps: int) -> float:
    rng = np.random.default_rng(12)
    sigma = math.sqrt(sigma2)
    safe = 0
    for _ in range(reps):
        # exact normal sufficient statistics of n units per arm, no true difference
        sums = rng.normal(0.0, sigma * math.sqrt(n), size=2)
        within = sigma2 * rng.chisquare(n - 1, size=2)
        sumsq = within + sums**2 / n
        est = diff_means(n, sums[0], sumsq[0], n, sums[1], sumsq[1])
        safe += confidence_sequence(est, alpha=0.05, n_star=n_star, side="upper").upper < delta
    return safe / reps


def test_sequential_n_gives_the_requested_power_means() -> None:
    sigma2, delta, n_star, reps = 1.0, 0.1, 5000.0, 4000
    n = math.ceil(sequential_samples_per_arm(sigma2, delta, n_star=n_star, power=0.8))
    rate = _proven_safe_rate_means(n, sigma2, delta, n_star, reps)
    assert rate == pytest.approx(0.8, abs=0.03)
    # and at the fixed-horizon n the sequence is clearly under-powered
    n_fixed = math.ceil(fixed_horizon_samples_per_arm(sigma2, delta))
    assert _proven_safe_rate_means(n_fixed, sigma2, delta, n_star, 1000) < 0.6


def test_sequential_n_gives_the_requested_power_proportions() -> None:
    rng = np.random.default_rng(13)
    p, delta, n_star, reps = 0.05, 0.01, 20_000.0, 4000
    n = math.ceil(
        sequential_samples_per_arm(proportion_variance(p), delta, n_star=n_star, power=0.9)
    )
    xb = rng.binomial(n, p, size=reps)
    xc = rng.binomial(n, p, size=reps)
    safe = sum(
        confidence_sequence(
            diff_proportions(xb[i], n, xc[i], n), alpha=0.05, n_star=n_star, side="upper"
        ).upper
        < delta
        for i in range(reps)
    )
    assert safe / reps == pytest.approx(0.9, abs=0.03)


def test_unreachable_margin_is_infinite() -> None:
    assert math.isinf(sequential_samples_per_arm(1.0, 1e-7, n_star=5000.0))
    assert sequential_samples_per_arm(0.0, 0.1, n_star=5000.0) == 0.0


def test_proportion_variance_and_validation() -> None:
    assert proportion_variance(0.2) == pytest.approx(sps.bernoulli(0.2).var())
    with pytest.raises(ValueError):
        proportion_variance(1.2)
    with pytest.raises(ValueError):
        fixed_horizon_samples_per_arm(1.0, 0.0)
    with pytest.raises(ValueError):
        sequential_samples_per_arm(1.0, 0.1, n_star=5000.0, power=0.3)
    with pytest.raises(ValueError):
        sequential_samples_per_arm(1.0, 0.1, n_star=0.0)
