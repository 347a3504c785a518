"""Sample sizes for a stage: how many units per arm a guardrail needs to pass.

Used before a rollout starts to tell the user how long each stage will take
at the expected traffic. The sequential sizes are for the decision
"safety proven": with no true difference, the one-sided always-valid upper
bound of harm falls below the non-inferiority margin ``delta``.
"""

from __future__ import annotations

import math
from statistics import NormalDist

from scipy import optimize

from safeshift.stats.sequential import boundary_multiplier

__all__ = [
    "MAX_SAMPLES_PER_ARM",
    "fixed_horizon_samples_per_arm",
    "proportion_variance",
    "sequential_samples_per_arm",
]

MAX_SAMPLES_PER_ARM = 1e9
"""Above this many units per arm a margin counts as unreachable (``inf``)."""


def _check(sigma2: float, delta: float, alpha: float, power: float) -> None:
    if not sigma2 >= 0 or not math.isfinite(sigma2):
        raise ValueError(f"sigma2 must be a finite non-negative variance, got {sigma2!r}")
    if delta == 0 or not math.isfinite(delta):
        raise ValueError(f"delta (the margin or effect) must be finite and non-zero, got {delta!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if not 0.5 <= power < 1.0:
        raise ValueError(f"power must be in [0.5, 1), got {power!r}")


def proportion_variance(p: float) -> float:
    """Per-unit variance p(1 - p) of a Bernoulli metric with rate ``p``."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"a proportion must be in [0, 1], got {p!r}")
    return p * (1.0 - p)


def fixed_horizon_samples_per_arm(
    sigma2: float,
    delta: float,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    one_sided: bool = True,
) -> float:
    """Units per arm for a single-look z-test of two equal arms.

    n = (z_{1-a} + z_{power})² · 2 sigma² / delta², a = alpha (one-sided) or
    alpha/2 (two-sided), the textbook normal-approximation formula (e.g.
    Chow, Shao & Wang, "Sample Size Calculations in Clinical Research", 3.2).
    ``sigma2`` is the per-unit variance of each arm. Not rounded up.
    """
    _check(sigma2, delta, alpha, power)
    z = NormalDist().inv_cdf
    z_alpha = z(1.0 - alpha) if one_sided else z(1.0 - alpha / 2.0)
    return (z_alpha + z(power)) ** 2 * 2.0 * sigma2 / delta**2


def sequential_samples_per_arm(
    sigma2: float,
    delta: float,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    n_star: float,
    one_sided: bool = True,
) -> float:
    """Units per arm for the confidence sequence to prove safety with probability ``power``.

    With no true difference and SE = sqrt(2 sigma² / n), the sequence's upper
    bound D + m(r)·SE lies below the margin ``delta`` with probability
    Phi(delta/SE - m(r)); the smallest n where that reaches ``power`` solves
        (z_power + m(r)) · SE = delta,   r = rho² · 2n  (units over both arms),
    with m the one-sided (or two-sided) normal-mixture multiplier of
    :func:`~safeshift.stats.sequential.boundary_multiplier`. The left side
    decreases in n, so the root is unique (found by Brent's method on log n).
    Returns ``inf`` when more than ``MAX_SAMPLES_PER_ARM`` would be needed.
    This is the n of a single look; monitoring continuously, large effects
    stop earlier. Not rounded up.
    """
    _check(sigma2, delta, alpha, power)
    if sigma2 == 0:
        return 0.0
    z_power = NormalDist().inv_cdf(power)
    margin = abs(delta)

    def excess(log_n: float) -> float:
        n = math.exp(log_n)
        m = boundary_multiplier(2.0 * n, n_star, alpha, one_sided=one_sided)
        return (z_power + m) * math.sqrt(2.0 * sigma2 / n) - margin

    lo, hi = math.log(1e-6), math.log(MAX_SAMPLES_PER_ARM)
    if excess(hi) > 0:
        return math.inf
    if excess(lo) <= 0:
        return math.exp(lo)
    root: float = optimize.brentq(excess, lo, hi, xtol=1e-12, rtol=1e-12)
    return math.exp(root)
