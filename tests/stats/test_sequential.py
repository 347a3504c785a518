"""Tests of the always-valid confidence sequences.

The Monte-Carlo tests monitor A/A experiments continuously (a look every
batch of units) and count replications in which the interval *ever* excludes
the truth; an always-valid interval must keep that rate at or below alpha,
while a naive z-test repeated at every look must not.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy import stats as sps

from safeshift.stats import (
    Estimate,
    always_valid_p_value,
    boundary_multiplier,
    confidence_sequence,
    confidence_sequence_one_sample,
    diff_means,
    diff_proportions,
    fixed_horizon_interval,
    mixture_rho2,
    one_sample_mean,
    one_sample_proportion,
)

ALPHA = 0.05
N_STAR = 5000.0
BATCH = 200
LOOKS = 100  # up to 20,000 units per arm


def mc_slack(rate: float, reps: int, k: float = 3.0) -> float:
    """k binomial standard errors of a Monte-Carlo rate."""
    return k * math.sqrt(rate * (1.0 - rate) / reps)


Arr = NDArray[np.float64]


def _monitor(estimates: Callable[[int, int], Estimate], reps: int, looks: int) -> dict[str, float]:
    """Fraction of replications in which each procedure ever rejects diff = 0."""
    ever_two = ever_lower = ever_upper = ever_naive = ever_p = 0
    for i in range(reps):
        two = low = up = naive = pv = False
        for j in range(looks):
            est = estimates(i, j)
            cs = confidence_sequence(est, alpha=ALPHA, n_star=N_STAR)
            two = two or cs.lower > 0.0 or cs.upper < 0.0
            low = (
                low or confidence_sequence(est, alpha=ALPHA, n_star=N_STAR, side="lower").lower > 0
            )
            up = up or confidence_sequence(est, alpha=ALPHA, n_star=N_STAR, side="upper").upper < 0
            fh = fixed_horizon_interval(est, alpha=ALPHA)
            naive = naive or fh.lower > 0.0 or fh.upper < 0.0
            pv = pv or always_valid_p_value(est, n_star=N_STAR, alpha=ALPHA) <= ALPHA
        ever_two += two
        ever_lower += low
        ever_upper += up
        ever_naive += naive
        ever_p += pv
    return {
        "two": ever_two / reps,
        "lower": ever_lower / reps,
        "upper": ever_upper / reps,
        "naive": ever_naive / reps,
        "p": ever_p / reps,
    }


def _normal_batches(
    rng: np.random.Generator, reps: int, looks: int, batch: int, mu: float, sigma: float
) -> tuple[Arr, Arr, Arr]:
    """Cumulative (n, sum, sum of squares) of normal data, simulated exactly per batch.

    The batch sum is N(batch·mu, batch·sigma²) and, independently, the
    within-batch sum of squared deviations is sigma²·chi²(batch - 1).
    """
    s = rng.normal(batch * mu, sigma * math.sqrt(batch), size=(reps, looks))
    within = sigma**2 * rng.chisquare(batch - 1, size=(reps, looks))
    ss = within + s**2 / batch
    n = np.broadcast_to(batch * np.arange(1, looks + 1, dtype=np.float64), (reps, looks))
    return n, np.cumsum(s, axis=1), np.cumsum(ss, axis=1)


def _lognormal_batches(
    rng: np.random.Generator, reps: int, looks: int, batch: int
) -> tuple[Arr, Arr, Arr]:
    s = np.empty((reps, looks))
    ss = np.empty((reps, looks))
    chunk = 50
    for start in range(0, reps, chunk):
        x = rng.lognormal(0.0, 1.0, size=(min(chunk, reps - start), looks, batch))
        s[start : start + chunk] = x.sum(axis=2)
        ss[start : start + chunk] = (x * x).sum(axis=2)
    n = np.broadcast_to(batch * np.arange(1, looks + 1, dtype=np.float64), (reps, looks))
    return n, np.cumsum(s, axis=1), np.cumsum(ss, axis=1)


# --- continuous monitoring: false-positive rate -------------------------------------------


@pytest.fixture(scope="module")
def aa_proportions() -> dict[str, float]:
    rng = np.random.default_rng(20240611)
    reps = 1000
    p = np.repeat([0.01, 0.02, 0.03, 0.04, 0.05], reps // 5)[:, None]
    xb = np.cumsum(rng.binomial(BATCH, p, size=(reps, LOOKS)), axis=1).astype(float)
    xc = np.cumsum(rng.binomial(BATCH, p, size=(reps, LOOKS)), axis=1).astype(float)
    n = BATCH * np.arange(1, LOOKS + 1, dtype=float)
    return _monitor(lambda i, j: diff_proportions(xb[i, j], n[j], xc[i, j], n[j]), reps, LOOKS) | {
        "reps": reps
    }


def test_aa_proportions_two_sided_rate_at_most_alpha(aa_proportions: dict[str, float]) -> None:
    reps = int(aa_proportions["reps"])
    assert aa_proportions["two"] <= ALPHA + mc_slack(ALPHA, reps)
    # the mSPRT p-value and the two-sided sequence reject on exactly the same looks
    assert aa_proportions["p"] == aa_proportions["two"]


def test_aa_proportions_one_sided_rates_at_most_alpha(aa_proportions: dict[str, float]) -> None:
    reps = int(aa_proportions["reps"])
    assert aa_proportions["lower"] <= ALPHA + mc_slack(ALPHA, reps)
    assert aa_proportions["upper"] <= ALPHA + mc_slack(ALPHA, reps)


def test_naive_z_test_under_monitoring_is_badly_inflated(
    aa_proportions: dict[str, float],
) -> None:
    # Armitage et al. (1969): ~37% after 100 looks; the test must be able to fail.
    assert aa_proportions["naive"] > 0.15
    assert aa_proportions["naive"] > 3 * aa_proportions["two"]


def test_aa_normal_means() -> None:
    rng = np.random.default_rng(7)
    reps = 600
    nb, sb, ssb = _normal_batches(rng, reps, LOOKS, BATCH, mu=3.0, sigma=2.0)
    nc, sc, ssc = _normal_batches(rng, reps, LOOKS, BATCH, mu=3.0, sigma=2.0)
    rates = _monitor(
        lambda i, j: diff_means(nb[i, j], sb[i, j], ssb[i, j], nc[i, j], sc[i, j], ssc[i, j]),
        reps,
        LOOKS,
    )
    assert rates["two"] <= ALPHA + mc_slack(ALPHA, reps)
    assert rates["lower"] <= ALPHA + mc_slack(ALPHA, reps)
    assert rates["naive"] > 0.15


def test_aa_lognormal_means_skewed() -> None:
    # Skewness ~6: the CLT approximation is poorer early on, so allow more slack.
    rng = np.random.default_rng(11)
    reps = 400
    nb, sb, ssb = _lognormal_batches(rng, reps, LOOKS, BATCH)
    nc, sc, ssc = _lognormal_batches(rng, reps, LOOKS, BATCH)
    rates = _monitor(
        lambda i, j: diff_means(nb[i, j], sb[i, j], ssb[i, j], nc[i, j], sc[i, j], ssc[i, j]),
        reps,
        LOOKS,
    )
    assert rates["two"] <= ALPHA + mc_slack(ALPHA, reps, k=4.0)
    assert rates["lower"] <= ALPHA + mc_slack(ALPHA, reps, k=4.0)
    assert rates["upper"] <= ALPHA + mc_slack(ALPHA, reps, k=4.0)


def test_aa_relative_difference_of_means() -> None:
    rng = np.random.default_rng(5)
    reps = 400
    nb, sb, ssb = _normal_batches(rng, reps, LOOKS, BATCH, mu=10.0, sigma=4.0)
    nc, sc, ssc = _normal_batches(rng, reps, LOOKS, BATCH, mu=10.0, sigma=4.0)
    rates = _monitor(
        lambda i, j: diff_means(
            nb[i, j], sb[i, j], ssb[i, j], nc[i, j], sc[i, j], ssc[i, j], relative=True
        ),
        reps,
        LOOKS,
    )
    assert rates["two"] <= ALPHA + mc_slack(ALPHA, reps)
    assert rates["lower"] <= ALPHA + mc_slack(ALPHA, reps)


def test_one_sample_sequence_covers_the_true_mean_at_every_look() -> None:
    rng = np.random.default_rng(3)
    reps, mu = 600, 0.8
    n, s, ss = _normal_batches(rng, reps, LOOKS, BATCH, mu=mu, sigma=1.5)
    misses = 0
    for i in range(reps):
        for j in range(LOOKS):
            mean, se = one_sample_mean(n[i, j], s[i, j], ss[i, j])
            cs = confidence_sequence_one_sample(mean, se, n[i, j], alpha=ALPHA, n_star=N_STAR)
            if not cs.lower <= mu <= cs.upper:
                misses += 1
                break
    assert misses / reps <= ALPHA + mc_slack(ALPHA, reps)


# --- power ---------------------------------------------------------------------------------


def test_power_harm_detected_for_doubled_error_rate() -> None:
    rng = np.random.default_rng(99)
    reps = 500
    xb = np.cumsum(rng.binomial(BATCH, 0.01, size=(reps, LOOKS)), axis=1).astype(float)
    xc = np.cumsum(rng.binomial(BATCH, 0.02, size=(reps, LOOKS)), axis=1).astype(float)
    n = BATCH * np.arange(1, LOOKS + 1, dtype=float)
    detected = 0
    for i in range(reps):
        for j in range(LOOKS):
            est = diff_proportions(xb[i, j], n[j], xc[i, j], n[j])
            if confidence_sequence(est, alpha=ALPHA, n_star=N_STAR, side="lower").lower > 0.0:
                detected += 1
                break
    assert detected / reps >= 0.95


# --- single look: comparison with scipy and coverage --------------------------------------


@pytest.mark.parametrize("side", ["two", "lower", "upper"])
def test_fixed_horizon_interval_matches_scipy(side: str) -> None:
    est = diff_proportions(412, 20_000, 455, 19_500)
    pb, pc = 412 / 20_000, 455 / 19_500
    assert est.se == pytest.approx(math.sqrt(pb * (1 - pb) / 20_000 + pc * (1 - pc) / 19_500))
    iv = fixed_horizon_interval(est, alpha=0.1, side=side)  # type: ignore[arg-type]
    if side == "two":
        lo, hi = sps.norm.interval(0.9, loc=est.diff, scale=est.se)
    elif side == "lower":
        lo, hi = est.diff + sps.norm.ppf(0.1) * est.se, math.inf
    else:
        lo, hi = -math.inf, est.diff + sps.norm.ppf(0.9) * est.se
    assert iv.lower == pytest.approx(lo, rel=1e-9)
    assert iv.upper == pytest.approx(hi, rel=1e-9)


def test_diff_means_matches_numpy_on_raw_data() -> None:
    rng = np.random.default_rng(1)
    b = rng.gamma(2.0, 3.0, size=3000)
    c = rng.gamma(2.2, 3.0, size=2500)
    est = diff_means(b.size, b.sum(), (b * b).sum(), c.size, c.sum(), (c * c).sum())
    assert est.diff == pytest.approx(c.mean() - b.mean(), rel=1e-9)
    welch_se = math.sqrt(c.var(ddof=1) / c.size + b.var(ddof=1) / b.size)
    assert est.se == pytest.approx(welch_se, rel=1e-8)
    # scipy's Welch t-test has statistic diff / se
    t = sps.ttest_ind(c, b, equal_var=False).statistic
    assert est.diff / est.se == pytest.approx(t, rel=1e-8)


def test_one_sample_estimates_match_scipy() -> None:
    mean, se = one_sample_proportion(37, 1200)
    assert mean == pytest.approx(37 / 1200)
    assert se == pytest.approx(sps.binom(1200, 37 / 1200).std() / 1200, rel=1e-12)
    x = np.random.default_rng(2).normal(5.0, 2.0, size=500)
    mean, se = one_sample_mean(x.size, x.sum(), (x * x).sum())
    assert mean == pytest.approx(x.mean())
    assert se == pytest.approx(sps.sem(x), rel=1e-9)


def _coverage(estimates: list[Estimate], truth: float) -> tuple[float, float]:
    fixed = sum(
        fixed_horizon_interval(e, alpha=ALPHA).lower
        <= truth
        <= fixed_horizon_interval(e, alpha=ALPHA).upper
        for e in estimates
    )
    seq = sum(
        confidence_sequence(e, alpha=ALPHA, n_star=N_STAR).lower
        <= truth
        <= confidence_sequence(e, alpha=ALPHA, n_star=N_STAR).upper
        for e in estimates
    )
    return fixed / len(estimates), seq / len(estimates)


def test_relative_difference_of_means_coverage_single_look() -> None:
    rng = np.random.default_rng(17)
    reps, nb, nc = 4000, 2000, 1500
    mb, mc = 10.0, 10.6
    _, sb, ssb = _normal_batches(rng, reps, 1, nb, mu=mb, sigma=3.0)
    _, sc, ssc = _normal_batches(rng, reps, 1, nc, mu=mc, sigma=5.0)
    ests = [
        diff_means(nb, sb[i, 0], ssb[i, 0], nc, sc[i, 0], ssc[i, 0], relative=True)
        for i in range(reps)
    ]
    fixed, seq = _coverage(ests, mc / mb - 1.0)
    assert abs(fixed - (1 - ALPHA)) <= mc_slack(ALPHA, reps, k=3.5)
    assert seq >= 1 - ALPHA


def test_relative_difference_of_proportions_coverage_single_look() -> None:
    rng = np.random.default_rng(23)
    reps, n = 4000, 8000
    pb, pc = 0.05, 0.04
    xb = rng.binomial(n, pb, size=reps)
    xc = rng.binomial(n, pc, size=reps)
    ests = [diff_proportions(xb[i], n, xc[i], n, relative=True) for i in range(reps)]
    fixed, seq = _coverage(ests, pc / pb - 1.0)
    assert abs(fixed - (1 - ALPHA)) <= mc_slack(ALPHA, reps, k=3.5)
    assert seq >= 1 - ALPHA


def test_relative_se_includes_baseline_uncertainty() -> None:
    # With a noisy baseline and a precise candidate, the Monte-Carlo spread of c/b - 1
    # is driven by the baseline; the delta-method SE must track it.
    rng = np.random.default_rng(29)
    reps = 3000
    _, sb, ssb = _normal_batches(rng, reps, 1, 400, mu=5.0, sigma=4.0)
    _, sc, ssc = _normal_batches(rng, reps, 1, 40_000, mu=5.0, sigma=0.5)
    ests = [
        diff_means(400, sb[i, 0], ssb[i, 0], 40_000, sc[i, 0], ssc[i, 0], relative=True)
        for i in range(reps)
    ]
    sd = float(np.std([e.diff for e in ests], ddof=1))
    mean_se = float(np.mean([e.se for e in ests]))
    assert mean_se == pytest.approx(sd, rel=0.08)


# --- the boundary itself -------------------------------------------------------------------


def test_boundary_at_n_star_matches_reference_value() -> None:
    # STATS.md / GrowthBook: K = 7.936 at alpha 0.05 and m(N*) = 3.04
    assert mixture_rho2(N_STAR, 0.05, one_sided=False) * N_STAR == pytest.approx(7.936, abs=1e-3)
    assert boundary_multiplier(N_STAR, N_STAR, 0.05, one_sided=False) == pytest.approx(
        3.04, abs=5e-3
    )


@pytest.mark.parametrize("one_sided", [False, True])
@pytest.mark.parametrize("alpha", [0.001, 0.01, 0.05])
def test_boundary_shape(alpha: float, one_sided: bool) -> None:
    ns = np.geomspace(1.0, 1e9, 400)
    m = np.array([boundary_multiplier(n, N_STAR, alpha, one_sided=one_sided) for n in ns])
    z = sps.norm.ppf(1 - alpha) if one_sided else sps.norm.ppf(1 - alpha / 2)
    # always wider than a single fixed look
    assert np.all(m > z)
    # the half-width m·sigma/sqrt(n) keeps shrinking as data accrues
    assert np.all(np.diff(m / np.sqrt(ns)) < 0)
    # tightest relative to the fixed-horizon interval near N* (K is an approximate minimiser)
    best = ns[np.argmin(m)]
    assert 0.8 * N_STAR <= best <= 1.25 * N_STAR
    # infinite at no data, unbounded (like sqrt(log n)) for huge n
    assert math.isinf(boundary_multiplier(0.0, N_STAR, alpha, one_sided=one_sided))
    assert m[-1] > m[np.argmin(m)] + 0.5


def test_one_sided_boundary_is_narrower_than_two_sided() -> None:
    # (for n << N* the one-sided rho² is smaller and the comparison can flip)
    for n in [100.0, 1000.0, N_STAR, 1e6]:
        one = boundary_multiplier(n, N_STAR, 0.05, one_sided=True)
        two = boundary_multiplier(n, N_STAR, 0.05, one_sided=False)
        assert one < two


def test_p_value_equals_alpha_on_the_boundary() -> None:
    # Johari et al.'s mSPRT with tau² = V·rho² crosses 1/alpha exactly where Howard et al.'s
    # normal-mixture boundary lies; the two are implemented independently.
    for n_each, se in [(50, 0.3), (2500, 0.01), (40_000, 0.002)]:
        m = boundary_multiplier(2 * n_each, N_STAR, ALPHA, one_sided=False)
        est = Estimate(m * se, se, n_each, n_each, 0.1, 0.1 + m * se, False)
        assert always_valid_p_value(est, n_star=N_STAR, alpha=ALPHA) == pytest.approx(ALPHA)
        assert always_valid_p_value(est, n_star=N_STAR, alpha=ALPHA, theta0=m * se) == 1.0


def test_interval_contains_estimate_and_sides() -> None:
    est = diff_proportions(100, 10_000, 120, 10_000)
    two = confidence_sequence(est, alpha=ALPHA, n_star=N_STAR)
    low = confidence_sequence(est, alpha=ALPHA, n_star=N_STAR, side="lower")
    up = confidence_sequence(est, alpha=ALPHA, n_star=N_STAR, side="upper")
    assert two.lower < est.diff < two.upper
    assert math.isinf(low.upper) and low.upper > 0 and two.lower < low.lower < est.diff
    assert math.isinf(up.lower) and up.lower < 0 and est.diff < up.upper < two.upper
    with pytest.raises(ValueError):
        confidence_sequence(est, alpha=ALPHA, n_star=N_STAR, side="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        boundary_multiplier(10.0, N_STAR, 1.5, one_sided=False)


# --- degenerate inputs never raise --------------------------------------------------------


def test_degenerate_inputs_give_unbounded_intervals() -> None:
    cases = [
        diff_means(1, 2.0, 4.0, 50, 100.0, 300.0),
        diff_means(0, 0.0, 0.0, 0, 0.0, 0.0),
        diff_means(50, 0.0, 10.0, 50, 5.0, 10.0, relative=True),
        diff_proportions(0, 100, 3, 100, relative=True),
        diff_proportions(5, 0, 3, 100),
    ]
    for est in cases:
        assert math.isinf(est.se)
        iv = confidence_sequence(est, alpha=ALPHA, n_star=N_STAR)
        assert iv.lower == -math.inf and iv.upper == math.inf
        assert always_valid_p_value(est, n_star=N_STAR) == 1.0
    assert math.isnan(cases[2].diff)  # relative to a zero baseline is undefined


def test_constant_data_has_zero_not_nan_variance() -> None:
    # ss - s²/n can round to a tiny negative number
    x = np.full(100_000, 0.1)
    est = diff_means(x.size, x.sum(), (x * x).sum(), x.size, x.sum(), (x * x).sum())
    assert est.se == 0.0 or (0.0 <= est.se < 1e-6)
    _, se = one_sample_mean(x.size, x.sum(), (x * x).sum())
    assert 0.0 <= se < 1e-6
