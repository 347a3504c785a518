"""Sample-ratio mismatch (SRM): is the observed traffic split the one that was asked for?

A split that differs from the configured one means assignment or logging is
broken, and every comparison between the arms is suspect. A rollout checks the
split at every look, so a chi-square test repeated each time would itself be
peeking; the sequential Dirichlet-multinomial test of Lindon & Malek (2022),
"Anytime-valid inference for multinomial count data" (NeurIPS), stays valid
under continuous monitoring.

Tiny deviations become significant at large n yet are harmless, so a mismatch
also requires a minimum absolute deviation of the shares (Mozilla's Jetstream
added the same kind of floor) and a minimum count per arm (GrowthBook: 8).

The test assumes each unit is counted once. A gateway counts first sightings per
process, so a restart or a second replica counts a unit again: a unit seen by k
processes adds k to its arm, and the counts vary E[k²]/E[k] times more than a
multinomial's, which would pause healthy rollouts. :func:`count_dispersion` estimates
that factor from the per-cluster counts (units hash into clusters independently of
their arm) and :func:`srm_test` divides the counts by it: the quasi-likelihood
correction of over-dispersed counts (McCullagh & Nelder 1989, §4.5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import special, stats

__all__ = ["SRMResult", "count_dispersion", "srm_log_bayes_factor", "srm_test"]


@dataclass(frozen=True, slots=True)
class SRMResult:
    """Outcome of one SRM check.

    ``p_value`` is min(1, 1/BF) at this look; callers keep the running minimum
    over looks, which is still a valid p-value. ``chi2_p_value`` is the
    classical (fixed-sample) goodness-of-fit p-value, for information only.
    """

    counts: tuple[int, ...]
    expected: tuple[float, ...]
    observed: tuple[float, ...]
    bayes_factor: float
    p_value: float
    chi2_p_value: float
    mismatch: bool
    dispersion: float = 1.0  # the counts were divided by this before testing (>= 1)


def _normalise(expected: Sequence[float], k: int) -> NDArray[np.float64]:
    shares = np.asarray(expected, dtype=np.float64)
    if shares.ndim != 1 or shares.size != k:
        raise ValueError(f"expected has {shares.size} shares for {k} arms; give one share per arm")
    if shares.size < 2:
        raise ValueError("an SRM check needs at least two arms")
    if not np.all(np.isfinite(shares)) or np.any(shares < 0) or shares.sum() <= 0:
        raise ValueError(f"expected shares must be finite, non-negative, not all 0: {expected!r}")
    normalised: NDArray[np.float64] = shares / shares.sum()
    return normalised


def srm_log_bayes_factor(
    counts: ArrayLike, expected: Sequence[float], *, concentration: float = 100.0
) -> NDArray[np.float64]:
    """Natural log of the Dirichlet-multinomial Bayes factor, vectorised over leading axes.

    ``counts`` has the arms on its last axis (cumulative counts at one or many
    looks). With theta0 the expected shares and a Dirichlet(a) prior,
    a_i = concentration · theta0_i, on the alternative (Lindon & Malek 2022):

        ln BF = ln G(A) - ln G(A + n) + sum_i [ln G(a_i + x_i) - ln G(a_i)] - sum_i x_i ln theta0_i

    with A = sum a_i and n = sum x_i. BF is the ratio of the sequence likelihoods,
    a non-negative martingale under H0, so by Ville's inequality
    P(sup_n BF >= 1/alpha) <= alpha. Arms with expected share 0 contribute
    nothing when empty; a unit on such an arm makes ln BF = +inf.
    """
    if not concentration > 0:
        raise ValueError(f"concentration must be positive, got {concentration!r}")
    x = np.asarray(counts, dtype=np.float64)
    theta0 = _normalise(expected, x.shape[-1])
    pos = theta0 > 0
    a = concentration * theta0[pos]
    xp = x[..., pos]
    n = xp.sum(axis=-1)
    big_a = a.sum()
    log_bf = (
        special.gammaln(big_a)
        - special.gammaln(big_a + n)
        + (special.gammaln(a + xp) - special.gammaln(a)).sum(axis=-1)
        - (xp * np.log(theta0[pos])).sum(axis=-1)
    )
    impossible = (x[..., ~pos] > 0).any(axis=-1)
    result: NDArray[np.float64] = np.where(impossible, np.inf, log_bf)
    return result


def _chi2_p_value(x: NDArray[np.float64], theta0: NDArray[np.float64]) -> float:
    n = x.sum()
    if n <= 0:
        return 1.0
    pos = theta0 > 0
    if np.any(x[~pos] > 0):
        return 0.0
    exp = n * theta0[pos]
    statistic = float(((x[pos] - exp) ** 2 / exp).sum())
    dof = int(pos.sum()) - 1
    if dof < 1:
        return 1.0
    return float(stats.chi2.sf(statistic, dof))


def srm_test(
    counts: Sequence[int],
    expected: Sequence[float],
    *,
    alpha: float = 0.001,
    min_deviation: float = 0.002,
    min_count: int = 8,
    concentration: float = 100.0,
    dispersion: float = 1.0,
) -> SRMResult:
    """Sequential SRM check of cumulative ``counts`` against ``expected`` shares.

    ``mismatch`` is true when the anytime-valid p-value at this look is below
    ``alpha``, the largest absolute share deviation is at least
    ``min_deviation``, and every arm with a positive expected share has at
    least ``min_count`` units. ``expected`` is normalised to sum to 1.

    ``dispersion`` (at least 1; see :func:`count_dispersion`) is how many times more the
    counts vary than independent units would: the tests see ``counts / dispersion``, the
    minimum count applies to the counts as given.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    x = np.asarray(counts, dtype=np.float64)
    if x.ndim != 1 or np.any(x < 0) or not np.all(np.isfinite(x)):
        raise ValueError(f"counts must be a flat sequence of non-negative numbers: {counts!r}")
    if not (math.isfinite(dispersion) and dispersion >= 1.0):
        raise ValueError(f"dispersion must be a finite number >= 1, got {dispersion!r}")
    theta0 = _normalise(expected, x.size)
    tested = x / dispersion
    log_bf = float(srm_log_bayes_factor(tested, expected, concentration=concentration))
    bayes_factor = math.exp(log_bf) if log_bf < 709.0 else math.inf
    p_value = 1.0 if log_bf <= 0 else math.exp(-log_bf)
    total = float(x.sum())
    observed = x / total if total > 0 else np.zeros_like(x)
    deviation = float(np.max(np.abs(observed - theta0))) if total > 0 else 0.0
    enough = bool(np.all(x[theta0 > 0] >= min_count))
    mismatch = p_value < alpha and deviation >= min_deviation and enough
    return SRMResult(
        counts=tuple(int(c) for c in x),
        expected=tuple(float(e) for e in theta0),
        observed=tuple(float(o) for o in observed),
        bayes_factor=bayes_factor,
        p_value=p_value,
        chi2_p_value=_chi2_p_value(tested, theta0),
        mismatch=mismatch,
        dispersion=float(dispersion),
    )


MIN_DISPERSION_CLUSTERS = 8
"""Fewer clusters with counts than this: no dispersion is estimated (1 is used)."""


def count_dispersion(clusters: ArrayLike) -> float:
    """How many times more two arms' counts vary than a binomial split of independent units:
    Pearson's X² over clusters against the pooled share, divided by its degrees of freedom
    (McCullagh & Nelder 1989, §4.5), and never below 1.

    ``clusters`` is an array of shape (clusters, 2): each row the counts of one cluster on the
    two arms (baseline, candidate). Units must fall into clusters by a hash independent of
    their arm. Each unit counted k times makes the ratio about E[k²]/E[k]; a genuine
    mismatch moves every cluster's share alike and leaves it near 1, because the deviations are
    taken from the pooled share, not the expected one. With fewer than
    :data:`MIN_DISPERSION_CLUSTERS` non-empty clusters the answer is 1."""
    x = np.asarray(clusters, dtype=np.float64).reshape(-1, 2)
    n = x.sum(axis=1)
    x, n = x[n > 0], n[n > 0]
    if n.size < MIN_DISPERSION_CLUSTERS:
        return 1.0
    share = float(x[:, 1].sum() / n.sum())
    if not 0.0 < share < 1.0:
        return 1.0
    statistic = float(((x[:, 1] - share * n) ** 2 / (n * share * (1.0 - share))).sum())
    return max(1.0, statistic / float(n.size - 1))
