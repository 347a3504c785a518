"""Distribution drift between a reference and a current window (inputs or predictions).

These are descriptive distances on binned data, used to watch a shadow or
canary model's output distribution against the baseline's, and inputs
against the training or previous window. They are not sequential tests: a
threshold on them is a heuristic, reported beside the guardrail decisions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import special, stats

__all__ = [
    "PSI_THRESHOLD",
    "DriftResult",
    "chi_square_classes",
    "histogram_counts",
    "histogram_edges",
    "jensen_shannon",
    "psi",
    "wasserstein_from_histograms",
]

PSI_THRESHOLD = 0.1
"""Drift threshold on the PSI (Evidently's default); feature-engine calls 0.25 "significant"."""

Floats = NDArray[np.float64]
Values = Sequence[float] | NDArray[Any]
"""Counts or values: a sequence of numbers or a 1-D numpy array."""


@dataclass(frozen=True, slots=True)
class DriftResult:
    """One drift measurement and whether it crossed its threshold."""

    metric: str
    value: float
    threshold: float
    drifted: bool


def _shares(counts: Values, name: str) -> Floats:
    x = np.asarray(counts, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty flat sequence of counts")
    if not np.all(np.isfinite(x)) or np.any(x < 0):
        raise ValueError(f"{name} must be finite and non-negative: {counts!r}")
    total = x.sum()
    if total <= 0:
        raise ValueError(f"{name} is empty (all counts are 0); measure drift once data arrives")
    shares: Floats = x / total
    return shares


def _pair(p_counts: Values, q_counts: Values) -> tuple[Floats, Floats]:
    p = _shares(p_counts, "p_counts")
    q = _shares(q_counts, "q_counts")
    if p.size != q.size:
        raise ValueError(f"the two histograms have {p.size} and {q.size} bins; use the same bins")
    return p, q


def psi(expected_counts: Values, actual_counts: Values, *, eps: float = 1e-4) -> float:
    """Population stability index over the same bins.

    PSI = sum_i (a_i - e_i) · ln(a_i / e_i) on the bin shares, i.e. the
    symmetrised Kullback-Leibler divergence (Jeffreys' J) of the binned
    distributions (Yurdakul 2018, "Statistical properties of population
    stability index"). Shares below ``eps`` are raised to ``eps`` so an empty
    bin gives a large but finite value, as Evidently does.
    """
    e, a = _pair(expected_counts, actual_counts)
    e = np.maximum(e, eps)
    a = np.maximum(a, eps)
    return float(np.sum((a - e) * np.log(a / e)))


def jensen_shannon(p_counts: Values, q_counts: Values) -> float:
    """Jensen-Shannon divergence in bits, in [0, 1] (Lin 1991, IEEE Trans. Inf. Theory).

    JS = KL(p || m)/2 + KL(q || m)/2 with m = (p + q)/2. This is the *square*
    of ``scipy.spatial.distance.jensenshannon(p, q, base=2)``, which returns
    the distance.
    """
    p, q = _pair(p_counts, q_counts)
    m = 0.5 * (p + q)
    kl_p = float(np.sum(special.rel_entr(p, m)))
    kl_q = float(np.sum(special.rel_entr(q, m)))
    return min(max(0.5 * (kl_p + kl_q) / math.log(2.0), 0.0), 1.0)


def _check_edges(edges: Values, bins: int) -> Floats:
    e = np.asarray(edges, dtype=np.float64)
    if bins < 1 or e.ndim != 1 or e.size != bins + 1:
        raise ValueError(f"{bins} bins need {bins + 1} edges, got {e.size}")
    if not np.all(np.isfinite(e)) or np.any(np.diff(e) <= 0):
        raise ValueError("edges must be finite and strictly increasing")
    return e


def wasserstein_from_histograms(edges: Values, p_counts: Values, q_counts: Values) -> float:
    """1-D earth mover's (Wasserstein-1) distance between two histograms on the same edges.

    W1 = integral |F_p(x) - F_q(x)| dx (Vallender 1974), with each bin's mass
    spread uniformly over the bin, so both CDFs are piecewise linear and the
    integral is exact bin by bin. In the units of the binned variable.
    """
    p, q = _pair(p_counts, q_counts)
    e = _check_edges(edges, p.size)
    d = np.concatenate([[0.0], np.cumsum(p - q)])
    d[-1] = 0.0
    left, right = d[:-1], d[1:]
    width = np.diff(e)
    same_sign = left * right >= 0
    abs_sum = np.abs(left) + np.abs(right)
    # where the CDF difference changes sign inside a bin, integrate the two triangles
    with np.errstate(invalid="ignore", divide="ignore"):
        crossing = np.where(abs_sum > 0, (left**2 + right**2) / (2.0 * abs_sum), 0.0)
    area = np.where(same_sign, 0.5 * abs_sum, crossing) * width
    return float(area.sum())


def chi_square_classes(
    p_counts: Mapping[str, float], q_counts: Mapping[str, float]
) -> tuple[float, float]:
    """Pearson chi-square test of homogeneity of two class distributions: (statistic, p-value).

    Builds the 2 x k contingency table over the union of the classes, drops
    classes absent from both, and uses ``scipy.stats.chi2_contingency`` (with
    its default Yates correction when only two classes remain). With fewer
    than two classes or an empty side there is nothing to test: (0.0, 1.0).
    """
    keys = sorted(set(p_counts) | set(q_counts))
    table = np.array(
        [[float(p_counts.get(k, 0.0)) for k in keys], [float(q_counts.get(k, 0.0)) for k in keys]]
    ).reshape(2, len(keys))
    if not np.all(np.isfinite(table)) or np.any(table < 0):
        raise ValueError("class counts must be finite and non-negative")
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or np.any(table.sum(axis=1) <= 0):
        return 0.0, 1.0
    res = stats.chi2_contingency(table)
    return float(res.statistic), float(res.pvalue)


def histogram_edges(values: Values, bins: int = 10) -> list[float]:
    """Quantile bin edges from a reference sample, deduplicated, for PSI.

    Equal-frequency bins put about the same share of the reference in every
    bin, the usual choice for PSI. Repeated values (discrete data) merge
    bins, so fewer than ``bins`` bins may come back. The outer edges are the
    sample's minimum and maximum; :func:`histogram_counts` puts values outside
    them in the outer bins. A constant sample gets one bin of width 1 around it.
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        raise ValueError("no finite reference values to place bin edges on")
    edges = np.unique(np.quantile(x, np.linspace(0.0, 1.0, bins + 1)))
    if edges.size < 2:
        v = float(edges[0])
        return [v - 0.5, v + 0.5]
    return [float(v) for v in edges]


def histogram_counts(values: Values, edges: Values) -> list[float]:
    """Counts of ``values`` in the bins [e_i, e_i+1), the last bin closed.

    Values below the first edge count in the first bin and values above the
    last edge in the last bin, so a current window can be compared with a
    reference binned by :func:`histogram_edges`. Non-finite values are ignored.
    """
    e = np.asarray(edges, dtype=np.float64)
    _check_edges(edges, e.size - 1)
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    idx = np.searchsorted(e[1:-1], x, side="right")
    return [float(c) for c in np.bincount(idx, minlength=e.size - 1)]
