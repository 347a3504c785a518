"""Tests of the sequential sample-ratio-mismatch check."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from safeshift.stats import SRMResult, count_dispersion, srm_log_bayes_factor, srm_test
from safeshift.stats.srm import MIN_DISPERSION_CLUSTERS


def mc_slack(rate: float, reps: int, k: float = 3.0) -> float:
    return k * math.sqrt(rate * (1.0 - rate) / reps)


def _aa_paths(
    rng: np.random.Generator, shares: list[float], reps: int, looks: int, batch: int
) -> np.ndarray:
    """Cumulative multinomial counts, shape (reps, looks, arms)."""
    draws = rng.multinomial(batch, shares, size=(reps, looks))
    return np.cumsum(draws, axis=1)


@pytest.mark.parametrize(
    ("shares", "seed"), [([0.5, 0.5], 1), ([0.5, 0.3, 0.2], 2), ([0.99, 0.01], 3)]
)
def test_aa_continuous_monitoring_false_alarm_rate(shares: list[float], seed: int) -> None:
    rng = np.random.default_rng(seed)
    alpha, reps, looks, batch = 0.05, 500, 200, 100  # a look every 100 units up to 20,000
    counts = _aa_paths(rng, shares, reps, looks, batch)
    log_bf = srm_log_bayes_factor(counts, shares)
    ever = np.any(log_bf >= math.log(1 / alpha), axis=1).mean()
    assert ever <= alpha + mc_slack(alpha, reps)
    # a chi-square test repeated at every look (peeking) is far less reliable
    n = counts.sum(axis=2, keepdims=True)
    exp = n * np.asarray(shares)
    chi2 = ((counts - exp) ** 2 / exp).sum(axis=2)
    naive = np.any(sps.chi2.sf(chi2, len(shares) - 1) < alpha, axis=1).mean()
    assert naive > 2.5 * alpha
    assert naive > ever


def test_aa_monitoring_through_srm_test() -> None:
    """The public function (with its deviation and count floors) at every look."""
    rng = np.random.default_rng(4)
    alpha, reps, looks = 0.05, 200, 50
    counts = _aa_paths(rng, [0.7, 0.3], reps, looks, 200)
    alarms = 0
    for i in range(reps):
        for j in range(looks):
            if srm_test(counts[i, j].tolist(), [0.7, 0.3], alpha=alpha).mismatch:
                alarms += 1
                break
    assert alarms / reps <= alpha + mc_slack(alpha, reps)


def test_vectorised_bayes_factor_agrees_with_srm_test() -> None:
    rng = np.random.default_rng(8)
    counts = _aa_paths(rng, [0.25, 0.25, 0.5], 3, 20, 50)
    log_bf = srm_log_bayes_factor(counts, [0.25, 0.25, 0.5])
    for i in range(3):
        for j in range(20):
            res = srm_test(counts[i, j].tolist(), [0.25, 0.25, 0.5])
            assert res.p_value == pytest.approx(min(1.0, math.exp(-log_bf[i, j])))


@pytest.mark.parametrize(
    ("counts", "expected", "concentration"),
    [
        ([40, 60], [0.5, 0.5], 100.0),
        ([12, 30, 58], [0.2, 0.3, 0.5], 10.0),
        ([990, 25], [0.99, 0.01], 100.0),
    ],
)
def test_bayes_factor_matches_scipy_distributions(
    counts: list[int], expected: list[float], concentration: float
) -> None:
    # BF = Dirichlet-multinomial marginal likelihood / multinomial likelihood (Lindon & Malek)
    n = sum(counts)
    a = concentration * np.asarray(expected)
    ref = sps.dirichlet_multinomial.logpmf(counts, a, n) - sps.multinomial.logpmf(
        counts, n, expected
    )
    got = float(srm_log_bayes_factor(counts, expected, concentration=concentration))
    assert got == pytest.approx(ref, rel=1e-9, abs=1e-9)
    res = srm_test(counts, expected, concentration=concentration)
    assert res.bayes_factor == pytest.approx(math.exp(ref), rel=1e-9)


def test_52_48_at_20000_is_detected() -> None:
    res = srm_test([10_400, 9_600], [0.5, 0.5])
    assert isinstance(res, SRMResult)
    assert res.mismatch
    assert res.p_value < 0.001
    assert res.observed == pytest.approx((0.52, 0.48))
    assert res.expected == (0.5, 0.5)


def test_exact_split_is_healthy() -> None:
    res = srm_test([10_000, 10_000], [1, 1])  # shares are normalised
    assert not res.mismatch
    assert res.p_value == 1.0
    assert res.chi2_p_value == pytest.approx(1.0)


def test_small_expected_share() -> None:
    healthy = srm_test([99_000, 1_000], [0.99, 0.01])
    assert not healthy.mismatch
    broken = srm_test([98_500, 1_500], [0.99, 0.01])  # candidate gets 1.5% instead of 1%
    assert broken.mismatch
    assert broken.p_value < 1e-6


def test_tiny_deviation_at_huge_n_is_significant_but_not_a_mismatch() -> None:
    res = srm_test([50_080_000, 49_920_000], [0.5, 0.5])
    assert res.p_value < 0.001  # statistically detectable ...
    assert not res.mismatch  # ... but 0.08 percentage points is below min_deviation
    assert srm_test([50_080_000, 49_920_000], [0.5, 0.5], min_deviation=0.0005).mismatch


def test_min_count_floor() -> None:
    res = srm_test([7, 400], [0.5, 0.5])
    assert res.p_value < 0.001 and not res.mismatch
    assert srm_test([7, 400], [0.5, 0.5], min_count=5).mismatch


def test_chi2_p_value_matches_scipy() -> None:
    counts, expected = [480, 310, 210], [0.5, 0.3, 0.2]
    ref = sps.chisquare(counts, f_exp=np.asarray(expected) * sum(counts)).pvalue
    assert srm_test(counts, expected).chi2_p_value == pytest.approx(ref, rel=1e-9)


def test_zero_expected_share() -> None:
    assert not srm_test([500, 500, 0], [0.5, 0.5, 0.0]).mismatch
    res = srm_test([500, 500, 9], [0.5, 0.5, 0.0])
    assert res.p_value == 0.0 and res.chi2_p_value == 0.0 and res.mismatch


def test_no_data() -> None:
    res = srm_test([0, 0], [0.5, 0.5])
    assert res.p_value == 1.0 and not res.mismatch and res.observed == (0.0, 0.0)


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ([1, 2], [0.5, 0.3, 0.2]),
        ([1, 2], [-0.5, 1.5]),
        ([1, 2], [0, 0]),
        ([5], [1.0]),
        ([-1, 3], [0.5, 0.5]),
    ],
)
def test_invalid_inputs_raise(counts: list[int], expected: list[float]) -> None:
    with pytest.raises(ValueError):
        srm_test(counts, expected)


# -- units counted more than once (restarts, replicas) ---------------------------------------

CLUSTERS = 64


def _replicas_reached(rng: np.random.Generator, requests: np.ndarray, replicas: int) -> np.ndarray:
    """How many of ``replicas`` a unit's requests reach when each goes to one at random."""
    return (rng.multinomial(requests, [1 / replicas] * replicas) > 0).sum(axis=1)


def _replica_counts(rng: np.random.Generator, *, units: int, share: float, replicas: int,
                    looks: int, candidate_loss: float = 0.0) -> np.ndarray:
    """Cumulative per-cluster counted units at each look, shape (looks, clusters, 2), for
    traffic spread over ``replicas`` processes that each count a unit on its first sighting:
    a unit whose requests reach k replicas is counted k times on its arm. ``candidate_loss``
    of the candidate's units go uncounted (a genuinely broken split)."""
    arm = (rng.random(units) < share).astype(int)
    kept = (arm == 0) | (rng.random(units) >= candidate_loss)
    cluster = rng.integers(0, CLUSTERS, units)
    requests = np.maximum(1, rng.lognormal(0.5, 1.2, units).astype(int))
    seen = _replicas_reached(rng, requests, replicas)
    out = np.zeros((looks, CLUSTERS, 2))
    for look in range(looks):
        m = slice(0, units * (look + 1) // looks)
        np.add.at(out[look], (cluster[m][kept[m]], arm[m][kept[m]]), seen[m][kept[m]])
    return out


def _ever_mismatch(paths: np.ndarray, share: float, *, alpha: float, adjust: bool) -> bool:
    for look in paths:
        totals = look.sum(axis=0)
        res = srm_test([int(totals[0]), int(totals[1])], [1 - share, share], alpha=alpha,
                       min_deviation=0.0, dispersion=count_dispersion(look) if adjust else 1.0)
        if res.mismatch:
            return True
    return False


def test_dispersion_is_one_for_units_counted_once_and_k2_over_k_for_repeats() -> None:
    rng = np.random.default_rng(11)
    once = [count_dispersion(_replica_counts(rng, units=4000, share=0.3, replicas=1,
                                             looks=1)[0]) for _ in range(100)]
    assert np.mean(once) < 1.15  # the ratio's mean is 1, clamped at 1 from below
    # four replicas: each unit counted once per replica its requests reached
    rng = np.random.default_rng(12)
    units, replicas = 20_000, 4
    requests = np.maximum(1, rng.lognormal(0.5, 1.2, units).astype(int))
    k = _replicas_reached(rng, requests, replicas)
    expected = float((k**2).mean() / k.mean())
    rng = np.random.default_rng(13)
    many = [count_dispersion(_replica_counts(rng, units=units, share=0.3, replicas=replicas,
                                             looks=1)[0]) for _ in range(40)]
    assert expected > 2.0
    assert np.mean(many) == pytest.approx(expected, rel=0.1)


def test_dispersion_needs_clusters_and_both_arms() -> None:
    assert count_dispersion(np.zeros((64, 2))) == 1.0
    assert count_dispersion([[5, 1]] * (MIN_DISPERSION_CLUSTERS - 1)) == 1.0
    assert count_dispersion([[5, 0]] * 64) == 1.0  # one arm only: nothing to spread
    with pytest.raises(ValueError, match="dispersion"):
        srm_test([10, 10], [0.5, 0.5], dispersion=0.5)


@pytest.mark.parametrize(("share", "units", "seed"), [(0.01, 20_000, 41), (0.1, 4000, 21),
                                                   (0.5, 4000, 42)])
def test_units_counted_by_several_replicas_do_not_pause_a_healthy_split(
        share: float, units: int, seed: int) -> None:
    """Four replicas each count a unit on first sight: unadjusted, the split check pauses a
    healthy rollout far more often than alpha (measured 0.073, 0.087 and 0.090 for a 1 %, 10 %
    and 50 % share at these seeds); divided by the estimated dispersion it holds (0.003, 0.010,
    0.000)."""
    alpha, reps = 0.01, 300
    rng = np.random.default_rng(seed)
    paths = [_replica_counts(rng, units=units, share=share, replicas=4, looks=10)
             for _ in range(reps)]
    naive = np.mean([_ever_mismatch(p, share, alpha=alpha, adjust=False) for p in paths])
    adjusted = np.mean([_ever_mismatch(p, share, alpha=alpha, adjust=True) for p in paths])
    assert naive > 5 * alpha
    assert adjusted <= alpha + mc_slack(alpha, reps)


def test_a_broken_split_is_still_found_through_the_dispersion() -> None:
    """A quarter of the candidate's units lost moves every cluster alike: the dispersion stays
    near 1 without replicas and the mismatch is found; with four replicas the counts hold less
    information (found: 0.92 with one, 0.84 with four at this seed), but most are still found."""
    alpha, reps, share = 0.01, 100, 0.1
    rng = np.random.default_rng(31)
    for replicas in (1, 4):
        paths = [_replica_counts(rng, units=4000, share=share, replicas=replicas, looks=10,
                                 candidate_loss=0.25) for _ in range(reps)]
        found = np.mean([_ever_mismatch(p, share, alpha=alpha, adjust=True) for p in paths])
        assert found >= (0.9 if replicas == 1 else 0.7), (replicas, found)
        assert np.mean([count_dispersion(p[-1]) for p in paths]) < (1.3 if replicas == 1 else 3.0)
