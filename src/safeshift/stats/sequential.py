"""Always-valid confidence sequences for a difference between two arms.

A rollout controller looks at its metrics continuously, so a fixed-sample test
repeated at every look inflates the false-positive rate ("peeking"; Armitage,
McPherson & Rowe 1969). The intervals here stay valid at every look at once:
with probability at least 1 - alpha they contain the true difference at all
sample sizes simultaneously.

Sources:

* Howard, Ramdas, McAuliffe & Sekhon (2021), "Time-uniform, nonparametric,
  nonasymptotic confidence sequences", Annals of Statistics: the normal-mixture
  boundary (two-sided and one-sided).
* Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas (2023), "Time-uniform central
  limit theory and asymptotic confidence sequences": the same boundary used
  with an estimated standard error (their eq. 134 for the one-sided case).
* Johari, Koomen, Pekelis & Walsh (2017/2022), "Always valid inference:
  continuous monitoring of A/B tests", Operations Research: the mixture SPRT
  and its always-valid p-value.

The tuning sample size ``n_star`` (N*) is the number of units at which the
interval is tightest relative to a fixed-horizon one; it must be fixed before
data arrives (for example from the rollout plan).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

__all__ = [
    "Estimate",
    "Interval",
    "Side",
    "always_valid_p_value",
    "boundary_multiplier",
    "confidence_sequence",
    "confidence_sequence_one_sample",
    "diff_means",
    "diff_proportions",
    "fixed_horizon_interval",
    "mixture_rho2",
    "one_sample_mean",
    "one_sample_proportion",
]

Side = Literal["two", "lower", "upper"]
"""Which bounds an interval has: both, only a lower one, or only an upper one."""

_SIDES: frozenset[str] = frozenset({"two", "lower", "upper"})


@dataclass(frozen=True, slots=True)
class Estimate:
    """A difference candidate - baseline (absolute, or relative = c/b - 1) with its standard error.

    Degenerate inputs never raise: an arm with too few units, or a zero
    baseline mean for a relative difference, gives ``se = inf`` (and ``diff``
    is NaN when the difference itself is undefined), which makes every
    interval built from it unbounded.
    """

    diff: float
    se: float
    n_baseline: int
    n_candidate: int
    mean_baseline: float
    mean_candidate: float
    relative: bool


@dataclass(frozen=True, slots=True)
class Interval:
    """A confidence interval (or one look of a confidence sequence).

    ``lower`` is ``-inf`` for a one-sided upper bound and ``upper`` is
    ``+inf`` for a one-sided lower bound; ``multiplier`` is the number of
    standard errors used.
    """

    lower: float
    upper: float
    estimate: float
    multiplier: float


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")


def _check_side(side: str) -> None:
    if side not in _SIDES:
        raise ValueError(f"side must be one of 'two', 'lower', 'upper', got {side!r}")


def _ratio_estimate(
    mean_b: float, var_b: float, n_b: float, mean_c: float, var_c: float, n_c: float
) -> tuple[float, float]:
    """Relative difference c/b - 1 and its delta-method standard error.

    var(c/b) ≈ var_c / (n_c b²) + c² var_b / (n_b b⁴) for independent arms
    (first-order Taylor expansion; e.g. Deng, Knoblich & Lu 2018, "Applying
    the delta method in metric analytics", KDD). The baseline's own
    uncertainty is included, which a naive "divide the absolute interval by b"
    would miss.
    """
    if mean_b == 0.0 or not math.isfinite(mean_b) or not math.isfinite(mean_c):
        return math.nan, math.inf
    diff = mean_c / mean_b - 1.0
    if math.isnan(var_b) or math.isnan(var_c):
        return diff, math.inf
    var = var_c / (n_c * mean_b**2) + mean_c**2 * var_b / (n_b * mean_b**4)
    return diff, math.sqrt(max(var, 0.0))


def diff_proportions(
    x_b: float, n_b: float, x_c: float, n_c: float, *, relative: bool = False
) -> Estimate:
    """Difference of two proportions (successes ``x`` out of ``n`` per arm).

    Absolute: D = p_c - p_b with the unpooled Wald standard error
    SE² = p_c(1-p_c)/n_c + p_b(1-p_b)/n_b. Relative: D = p_c/p_b - 1 with the
    delta-method standard error. An empty arm gives ``se = inf``.

    Note that the Wald SE is 0 when both arms have no (or only) successes;
    callers should require a minimum number of units before trusting it.
    """
    p_b = x_b / n_b if n_b > 0 else math.nan
    p_c = x_c / n_c if n_c > 0 else math.nan
    var_b = max(p_b * (1.0 - p_b), 0.0)
    var_c = max(p_c * (1.0 - p_c), 0.0)
    return _two_arm(p_b, var_b, n_b, p_c, var_c, n_c, relative=relative, min_n=1.0)


def _sample_variance(n: float, s: float, ss: float) -> float:
    """Unbiased sample variance from (n, sum, sum of squares); NaN when n < 2.

    Rounding in ss - s²/n can make a zero variance slightly negative, so the
    result is clamped at 0.
    """
    if n < 2:
        return math.nan
    return max((ss - s * s / n) / (n - 1.0), 0.0)


def diff_means(
    n_b: float,
    sum_b: float,
    sumsq_b: float,
    n_c: float,
    sum_c: float,
    sumsq_c: float,
    *,
    relative: bool = False,
) -> Estimate:
    """Difference of two means from sufficient statistics (n, sum, sum of squares).

    Absolute: SE² = s_c²/n_c + s_b²/n_b (Welch). Relative: D = c/b - 1 with the
    delta-method standard error including the baseline's uncertainty. Fewer
    than two units on an arm, or a zero baseline mean for ``relative``, gives
    ``se = inf``.
    """
    mean_b = sum_b / n_b if n_b > 0 else math.nan
    mean_c = sum_c / n_c if n_c > 0 else math.nan
    var_b = _sample_variance(n_b, sum_b, sumsq_b)
    var_c = _sample_variance(n_c, sum_c, sumsq_c)
    return _two_arm(mean_b, var_b, n_b, mean_c, var_c, n_c, relative=relative, min_n=2.0)


def _two_arm(
    mean_b: float,
    var_b: float,
    n_b: float,
    mean_c: float,
    var_c: float,
    n_c: float,
    *,
    relative: bool,
    min_n: float,
) -> Estimate:
    enough = n_b >= min_n and n_c >= min_n and not (math.isnan(var_b) or math.isnan(var_c))
    if relative:
        diff, se = _ratio_estimate(mean_b, var_b, n_b, mean_c, var_c, n_c)
        if not enough:
            se = math.inf
    else:
        diff = mean_c - mean_b
        se = math.sqrt(var_c / n_c + var_b / n_b) if enough else math.inf
    return Estimate(
        diff=diff,
        se=se,
        n_baseline=int(n_b),
        n_candidate=int(n_c),
        mean_baseline=mean_b,
        mean_candidate=mean_c,
        relative=relative,
    )


def mixture_rho2(n_star: float, alpha: float, *, one_sided: bool) -> float:
    """Mixing precision rho² = K / N* that makes the boundary tightest near n = N*.

    K = -2 ln(a) + ln(1 - 2 ln(a)) with a = alpha (two-sided) or 2·alpha
    (one-sided): the approximate minimiser of the normal-mixture boundary
    relative to sqrt(n) (Howard et al. 2021, Section 3.5; GrowthBook's
    sequential intervals use the same tuning).
    """
    _check_alpha(alpha)
    if not n_star > 0:
        raise ValueError(f"n_star must be positive, got {n_star!r}")
    a = 2.0 * alpha if one_sided else alpha
    if one_sided and a >= 1.0:
        raise ValueError(f"a one-sided boundary needs alpha < 0.5, got {alpha!r}")
    log_a = math.log(a)
    return (-2.0 * log_a + math.log(1.0 - 2.0 * log_a)) / n_star


def boundary_multiplier(n: float, n_star: float, alpha: float, *, one_sided: bool) -> float:
    """Standard errors to add and subtract at ``n`` units (normal-mixture boundary).

    Two-sided (Howard et al. 2021, eq. 14 standardised):
        m(r) = sqrt((1 + 1/r) · ln((1 + r) / alpha²)),  r = rho² · n.
    One-sided (Howard et al. 2021, one-sided normal mixture; Waudby-Smith et
    al. 2023 eq. 134):
        m1(r)² = 2 (1 + 1/r) · ln(1 + sqrt(1 + r) / (2 alpha)).
    The multiplier is infinite before any data (n <= 0).
    """
    rho2 = mixture_rho2(n_star, alpha, one_sided=one_sided)
    if not n > 0:
        return math.inf
    r = rho2 * n
    if one_sided:
        m2 = 2.0 * (1.0 + 1.0 / r) * math.log1p(math.sqrt(1.0 + r) / (2.0 * alpha))
    else:
        m2 = (1.0 + 1.0 / r) * (math.log1p(r) - 2.0 * math.log(alpha))
    return math.sqrt(m2)


def _interval(estimate: float, se: float, m: float, side: str) -> Interval:
    half = m * se if math.isfinite(se) and math.isfinite(m) else math.inf
    lower = -math.inf if side == "upper" else estimate - half
    upper = math.inf if side == "lower" else estimate + half
    if math.isnan(lower):
        lower = -math.inf
    if math.isnan(upper):
        upper = math.inf
    return Interval(lower=lower, upper=upper, estimate=estimate, multiplier=m)


def confidence_sequence(
    est: Estimate, *, alpha: float, n_star: float, side: Side = "two", n: float | None = None
) -> Interval:
    """Always-valid (1 - alpha) interval for ``est.diff`` at the current look.

    ``n`` is the boundary's time: the information so far in samples, on the
    same scale as ``n_star`` — by default the samples over both arms; callers
    with an uneven split or clustered samples pass their effective sample size.
    ``side="lower"`` gives [lower, +inf) and ``side="upper"`` (-inf, upper],
    each at level 1 - alpha on its own (use them for "harm proven" and "safety
    proven").
    """
    _check_side(side)
    if n is None:
        n = float(est.n_baseline + est.n_candidate)
    m = boundary_multiplier(n, n_star, alpha, one_sided=side != "two")
    return _interval(est.diff, est.se, m, side)


def always_valid_p_value(
    est: Estimate, *, n_star: float, alpha: float = 0.05, theta0: float = 0.0
) -> float:
    """Always-valid p-value of H0: diff = theta0 at this look (mixture SPRT).

    Johari et al. (2022): with V = SE² · n (per-unit variance) and a normal
    mixing distribution N(theta0, tau²),
        Lambda_n = sqrt(V / (V + n tau²)) · exp(n² tau² (D - theta0)² / (2 V (V + n tau²))),
    and p_n = min(1, 1 / Lambda_n). Choosing tau² = V · rho² (rho² from
    ``alpha`` and ``n_star``) makes {p_n <= alpha} exactly the event that the
    two-sided confidence sequence excludes theta0. Callers keep the running
    minimum over looks, which stays valid.
    """
    n = float(est.n_baseline + est.n_candidate)
    rho2 = mixture_rho2(n_star, alpha, one_sided=False)
    d = est.diff - theta0
    if not n > 0 or math.isnan(d) or math.isnan(est.se) or not math.isfinite(est.se):
        return 1.0
    if est.se == 0.0:
        return 1.0 if d == 0.0 else 0.0
    v = est.se**2 * n
    tau2 = v * rho2
    log_lambda = 0.5 * math.log(v / (v + n * tau2)) + (n * n * tau2 * d * d) / (
        2.0 * v * (v + n * tau2)
    )
    if log_lambda <= 0.0:
        return 1.0
    return math.exp(-log_lambda)


def one_sample_proportion(x: float, n: float) -> tuple[float, float]:
    """Mean and Wald standard error of one proportion; (NaN, inf) when n <= 0."""
    if not n > 0:
        return math.nan, math.inf
    p = x / n
    return p, math.sqrt(max(p * (1.0 - p), 0.0) / n)


def one_sample_mean(n: float, s: float, ss: float) -> tuple[float, float]:
    """Mean and standard error of one arm from (n, sum, sum of squares); se = inf when n < 2."""
    if not n > 0:
        return math.nan, math.inf
    var = _sample_variance(n, s, ss)
    if math.isnan(var):
        return s / n, math.inf
    return s / n, math.sqrt(var / n)


def confidence_sequence_one_sample(
    mean: float, se: float, n: float, *, alpha: float, n_star: float, side: Side = "two"
) -> Interval:
    """Always-valid interval for one arm's mean, e.g. an absolute SLO on the candidate.

    Same normal-mixture boundary as :func:`confidence_sequence`, with ``n`` the
    units of this arm.
    """
    _check_side(side)
    m = boundary_multiplier(n, n_star, alpha, one_sided=side != "two")
    return _interval(mean, se, m, side)


def fixed_horizon_interval(est: Estimate, *, alpha: float, side: Side = "two") -> Interval:
    """Classical z interval (valid at one pre-planned look only), for comparison."""
    _check_alpha(alpha)
    _check_side(side)
    z = NormalDist().inv_cdf(1.0 - (alpha / 2.0 if side == "two" else alpha))
    return _interval(est.diff, est.se, z, side)
