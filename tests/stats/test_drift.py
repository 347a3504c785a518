"""Tests of the drift distances against scipy and closed forms."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps
from scipy.spatial import distance

from safeshift.stats import (
    PSI_THRESHOLD,
    DriftResult,
    chi_square_classes,
    histogram_counts,
    histogram_edges,
    jensen_shannon,
    psi,
    wasserstein_from_histograms,
)


def _normal_bin_probs(edges: np.ndarray, mu: float) -> np.ndarray:
    cdf = sps.norm.cdf(edges, loc=mu)
    return np.diff(cdf)


# --- PSI -----------------------------------------------------------------------------------


def test_psi_zero_for_identical_and_scale_free() -> None:
    counts = [120.0, 300.0, 80.0, 500.0]
    assert psi(counts, counts) == 0.0
    assert psi(counts, [2 * c for c in counts]) == pytest.approx(0.0, abs=1e-15)


def test_psi_symmetric_and_non_negative() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = rng.integers(0, 1000, size=8).astype(float) + 1
        b = rng.integers(0, 1000, size=8).astype(float) + 1
        assert psi(a, b) == pytest.approx(psi(b, a), rel=1e-12)
        assert psi(a, b) >= 0.0


def test_psi_approaches_jeffreys_divergence_of_shifted_normals() -> None:
    # For N(0,1) vs N(d,1), Jeffreys' J = KL + reverse KL = d². Binning can only lose
    # information, so PSI on fine equal-probability bins approaches d² from below.
    edges = sps.norm.ppf(np.linspace(0.0, 1.0, 201))
    previous = 0.0
    for d in [0.05, 0.1, 0.2, 0.3, 0.5]:
        value = psi(_normal_bin_probs(edges, 0.0), _normal_bin_probs(edges, d))
        assert value <= d**2
        assert value == pytest.approx(d**2, rel=0.05)
        assert value > previous  # grows with the shift
        previous = value
    # the conventional 0.1 threshold corresponds to a shift of about a third of a sd
    assert psi(_normal_bin_probs(edges, 0.0), _normal_bin_probs(edges, 0.33)) > PSI_THRESHOLD
    assert psi(_normal_bin_probs(edges, 0.0), _normal_bin_probs(edges, 0.3)) < PSI_THRESHOLD


def test_psi_empty_bin_is_finite_and_large() -> None:
    value = psi([100, 100, 0], [100, 100, 50])
    assert math.isfinite(value) and value > 0.25


def test_psi_on_samples_with_reference_edges() -> None:
    rng = np.random.default_rng(1)
    ref = rng.normal(size=50_000)
    edges = histogram_edges(ref.tolist(), bins=10)
    same = histogram_counts(rng.normal(size=50_000).tolist(), edges)
    shifted = histogram_counts(rng.normal(0.5, 1.0, size=50_000).tolist(), edges)
    base = histogram_counts(ref.tolist(), edges)
    assert psi(base, same) < 0.01
    assert psi(base, shifted) > PSI_THRESHOLD


# --- Jensen-Shannon ------------------------------------------------------------------------


def test_jensen_shannon_is_scipy_distance_squared() -> None:
    rng = np.random.default_rng(2)
    for _ in range(50):
        p = rng.integers(0, 50, size=6).astype(float)
        q = rng.integers(0, 50, size=6).astype(float)
        p[0] += 1
        q[0] += 1
        ref = distance.jensenshannon(p, q, base=2) ** 2
        assert jensen_shannon(p, q) == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_jensen_shannon_bounds() -> None:
    assert jensen_shannon([1, 2, 3], [2, 4, 6]) == pytest.approx(0.0, abs=1e-15)
    assert jensen_shannon([5, 0], [0, 7]) == pytest.approx(1.0)


# --- Wasserstein ---------------------------------------------------------------------------


def test_wasserstein_matches_scipy_on_samples_with_fine_bins() -> None:
    rng = np.random.default_rng(3)
    u = rng.normal(0.0, 1.0, size=100_000)
    v = rng.normal(0.5, 1.5, size=100_000)
    ref = sps.wasserstein_distance(u, v)
    lo, hi = min(u.min(), v.min()), max(u.max(), v.max())
    edges = np.linspace(lo, hi, 2001)
    pu, _ = np.histogram(u, bins=edges)
    pv, _ = np.histogram(v, bins=edges)
    assert wasserstein_from_histograms(edges.tolist(), pu, pv) == pytest.approx(ref, rel=0.01)


def test_wasserstein_uniform_blocks_exact() -> None:
    # U(0,1) vs U(2,3): every unit of mass moves by 2
    assert wasserstein_from_histograms([0, 1, 2, 3], [1, 0, 0], [0, 0, 1]) == pytest.approx(2.0)
    assert wasserstein_from_histograms([0, 1, 2, 3], [4, 5, 6], [4, 5, 6]) == 0.0


def test_wasserstein_equals_numerical_cdf_integral() -> None:
    # Piecewise-uniform mass means piecewise-linear CDFs; integrate |F_p - F_q| numerically.
    rng = np.random.default_rng(4)
    for _ in range(20):
        edges = np.cumsum(rng.uniform(0.1, 2.0, size=9))
        p = rng.integers(0, 20, size=8).astype(float) + 0.5
        q = rng.integers(0, 20, size=8).astype(float) + 0.5
        x = np.linspace(edges[0], edges[-1], 400_001)
        fp = np.interp(x, edges, np.concatenate([[0], np.cumsum(p) / p.sum()]))
        fq = np.interp(x, edges, np.concatenate([[0], np.cumsum(q) / q.sum()]))
        ref = np.trapezoid(np.abs(fp - fq), x)
        assert wasserstein_from_histograms(edges.tolist(), p, q) == pytest.approx(ref, rel=1e-5)


def test_wasserstein_rejects_bad_edges() -> None:
    with pytest.raises(ValueError):
        wasserstein_from_histograms([0, 1, 2], [1, 2, 3], [1, 2, 3])
    with pytest.raises(ValueError):
        wasserstein_from_histograms([0, 2, 1], [1, 2], [1, 2])


# --- classes -------------------------------------------------------------------------------


def test_chi_square_classes_matches_pearson_by_hand() -> None:
    p = {"cat": 120.0, "dog": 80.0, "bird": 50.0}
    q = {"dog": 110.0, "cat": 100.0, "bird": 40.0, "fish": 0.0}
    obs = np.array([[120, 80, 50], [100, 110, 40]], dtype=float)
    exp = obs.sum(axis=1, keepdims=True) * obs.sum(axis=0, keepdims=True) / obs.sum()
    stat = float(((obs - exp) ** 2 / exp).sum())
    got_stat, got_p = chi_square_classes(p, q)
    assert got_stat == pytest.approx(stat, rel=1e-12)
    assert got_p == pytest.approx(sps.chi2.sf(stat, 2), rel=1e-9)


def test_chi_square_classes_union_of_keys() -> None:
    # a class seen only on one side is part of the table
    stat, p = chi_square_classes({"a": 500, "b": 500}, {"a": 500, "b": 400, "c": 100})
    assert stat > 50 and p < 1e-10


def test_chi_square_classes_degenerate() -> None:
    assert chi_square_classes({"a": 10, "b": 0}, {"a": 12, "c": 0}) == (0.0, 1.0)
    assert chi_square_classes({}, {"a": 3, "b": 4}) == (0.0, 1.0)


def test_chi_square_classes_level_under_null() -> None:
    rng = np.random.default_rng(5)
    probs = [0.6, 0.3, 0.1]
    reps, rejections = 1000, 0
    for _ in range(reps):
        a = rng.multinomial(400, probs)
        b = rng.multinomial(300, probs)
        _, p = chi_square_classes(
            dict(zip("xyz", a, strict=True)), dict(zip("xyz", b, strict=True))
        )
        rejections += p < 0.05
    assert abs(rejections / reps - 0.05) <= 3 * math.sqrt(0.05 * 0.95 / reps)


# --- edges and counts ----------------------------------------------------------------------


def test_histogram_edges_give_equal_frequency_bins() -> None:
    rng = np.random.default_rng(6)
    ref = rng.exponential(size=20_000)
    edges = histogram_edges(ref.tolist(), bins=10)
    assert len(edges) == 11 and all(b > a for a, b in itertools.pairwise(edges))
    counts = histogram_counts(ref.tolist(), edges)
    assert sum(counts) == ref.size
    assert max(abs(c / ref.size - 0.1) for c in counts) < 0.002


def test_histogram_edges_discrete_and_constant() -> None:
    edges = histogram_edges([1.0] * 90 + [2.0] * 5 + [3.0] * 5, bins=10)
    assert all(b > a for a, b in itertools.pairwise(edges))
    assert len(edges) < 11
    const = histogram_edges([4.0] * 10)
    assert len(const) == 2 and const[0] < 4.0 < const[1]


def test_histogram_counts_out_of_range_go_to_outer_bins() -> None:
    assert histogram_counts([-5.0, 0.0, 0.5, 1.0, 1.5, 2.0, 9.0], [0.0, 1.0, 2.0]) == [3.0, 4.0]


def test_drift_result_is_a_plain_record() -> None:
    r = DriftResult(metric="psi", value=0.2, threshold=PSI_THRESHOLD, drifted=True)
    assert r.drifted and r.threshold == 0.1
    with pytest.raises(AttributeError):
        r.value = 0.0  # type: ignore[misc]
