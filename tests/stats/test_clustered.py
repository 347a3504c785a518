"""Unit-level variance of ratio metrics: against statsmodels' cluster-robust standard errors,
and by seeded Monte-Carlo on traffic whose users differ (the case that broke the request-level
analysis: a few users fail far more often, and some send far more requests)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import statsmodels.api as sm

from safeshift.stats import cluster_ratio, diff_proportions, diff_ratios


def population(rng: np.random.Generator, units: int) -> tuple[np.ndarray, np.ndarray]:
    """Requests per unit (heavy-tailed) and each unit's error propensity (Beta, with a few units
    that fail often)."""
    requests = np.maximum(1, np.round(rng.lognormal(1.0, 1.2, units))).astype(int)
    p = rng.beta(0.5, 49.5, units)
    bad = rng.random(units) < 0.02
    p[bad] = 0.3
    return requests, p


def draw(rng: np.random.Generator, requests: np.ndarray, p: np.ndarray) -> np.ndarray:
    return rng.binomial(requests, p)


def bucket_sums(units: np.ndarray, n: np.ndarray, s: np.ndarray,
                buckets: int) -> tuple[np.ndarray, np.ndarray]:
    b = units % buckets
    return np.bincount(b, n, buckets), np.bincount(b, s, buckets)


def test_per_unit_clusters_match_statsmodels_cluster_robust_errors() -> None:
    rng = np.random.default_rng(7)
    requests, p = population(rng, 400)
    errors = draw(rng, requests, p)
    # one row per request, grouped by unit
    unit_of_row = np.repeat(np.arange(len(requests)), requests)
    y = np.concatenate([np.r_[np.ones(e), np.zeros(r - e)] for r, e in zip(requests, errors,
                                                                         strict=True)])
    fit = sm.OLS(y, np.ones_like(y)).fit(cov_type="cluster", cov_kwds={"groups": unit_of_row})
    ratio, var, groups = cluster_ratio(requests, errors)
    assert groups == 400
    assert ratio == pytest.approx(float(fit.params[0]), rel=1e-12)
    # statsmodels' small-sample factor is G/(G-1) · (N-1)/(N-K); with one regressor, G/(G-1)
    assert math.sqrt(var) == pytest.approx(float(fit.bse[0]), rel=1e-9)
    # and the users differ: requests treated as independent understate the error
    iid = diff_proportions(0, 1, errors.sum(), requests.sum()).se
    assert math.sqrt(var) > 1.3 * iid


def test_buckets_of_units_estimate_the_true_variance() -> None:
    """64 hash buckets instead of per-unit totals: the estimate stays unbiased and its intervals
    cover. Each replication draws a new population, as assigning users to arms at random does
    in a rollout: the differences between users are the variance to estimate."""
    rng = np.random.default_rng(2026)
    ratios, variances, iid = [], [], []
    for _ in range(1500):
        requests, p = population(rng, 2000)
        errors = draw(rng, requests, p)
        n, s = bucket_sums(rng.permutation(len(requests)), requests, errors, 64)
        r, v, g = cluster_ratio(n, s)
        ratios.append(r)
        variances.append(v)
        iid.append(r * (1 - r) / n.sum())
        assert g == 64
    true_var = float(np.var(ratios, ddof=1))
    assert np.mean(variances) / true_var == pytest.approx(1.0, abs=0.1)
    assert np.mean(iid) / true_var < 0.6  # what the request-level analysis assumed


def test_difference_of_two_arms_and_its_relative_form() -> None:
    """Identical arms of different users: the standard error matches the spread of the
    difference, and a z-statistic on it has the normal's upper tail — the tail a harm test
    uses — where the request-level one is exceeded tens of times too often."""
    rng = np.random.default_rng(11)
    diffs, rels, ses, rel_ses, iid = [], [], [], [], []
    for _ in range(3000):
        arms = []
        for _arm in range(2):
            requests, p = population(rng, 1500)
            errors = draw(rng, requests, p)
            n, s = bucket_sums(np.arange(1500), requests, errors, 64)
            arms.append((n, s))
        (nb, sb), (nc, sc) = arms
        iid.append(diff_proportions(sb.sum(), nb.sum(), sc.sum(), nc.sum()).se)
        est = diff_ratios(nb, sb, nc, sc)
        rel = diff_ratios(nb, sb, nc, sc, relative=True)
        diffs.append(est.diff)
        rels.append(rel.diff)
        ses.append(est.se)
        rel_ses.append(rel.se)
        assert est.mean_candidate - est.mean_baseline == pytest.approx(est.diff)
        assert rel.diff == pytest.approx(est.mean_candidate / est.mean_baseline - 1)
    assert np.mean(ses) / np.std(diffs, ddof=1) == pytest.approx(1.0, abs=0.1)
    assert np.mean(rel_ses) / np.std(rels, ddof=1) == pytest.approx(1.0, abs=0.12)
    z = np.array(diffs) / np.array(ses)
    assert np.mean(z > 1.96) <= 0.035  # nominal 0.025
    assert np.mean(z > 2.5) <= 0.011  # nominal 0.0062
    assert np.mean(np.array(diffs) / np.array(iid) > 3) > 0.02  # nominal 0.00135


def test_degenerate_inputs_never_raise_and_are_never_certain() -> None:
    assert math.isnan(cluster_ratio([0, 0], [0, 0])[0])
    r, v, g = cluster_ratio([5, 0], [1, 0])  # one cluster: no variance estimate
    assert r == 0.2 and v == math.inf and g == 1
    est = diff_ratios([0], [0], [3, 4], [1, 1])
    assert est.se == math.inf
    assert diff_ratios([3, 4], [0, 0], [3, 4], [1, 1], relative=True).se == math.inf
    with pytest.raises(ValueError, match="same length"):
        cluster_ratio([1, 2], [1])
