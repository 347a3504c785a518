"""Thompson-sampling traffic allocation among several candidates.

When a rollout compares several candidate models, sending more traffic to the
ones that look best finds the winner with fewer wasted units. The posterior
probability that each arm is best is estimated by Monte Carlo, and traffic is
split by it (Thompson 1933) or by top-two Thompson sampling, which keeps
measuring the runner-up and is better for identifying the best arm
(Russo 2016, "Simple Bayesian algorithms for best arm identification", COLT).

Adaptive allocation biases the naive per-arm estimates (Nie, Tian, Taylor &
Zou 2018, arXiv:1705.09952; Shin, Ramdas & Rinaldo 2019, arXiv:1905.11397),
so guardrail decisions must still use the always-valid tests of
:mod:`safeshift.stats.sequential`; these shares only steer traffic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

__all__ = ["ArmStats", "BanditKind", "probability_best", "thompson_allocation"]

BanditKind = Literal["bernoulli", "gaussian"]

Floats = NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class ArmStats:
    """What is known about one arm: units ``n`` and either successes or (sum, sum of squares)."""

    name: str
    n: float
    successes: float = 0.0
    sum: float = 0.0
    sumsq: float = 0.0


def _check_arms(arms: Sequence[ArmStats]) -> None:
    if not arms:
        raise ValueError("a bandit needs at least one arm")
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must be unique, got {names!r}")
    for a in arms:
        if not a.n >= 0:
            raise ValueError(f"arm {a.name!r} has a negative unit count {a.n!r}")


def _posterior_draws(
    arms: Sequence[ArmStats], kind: BanditKind, draws: int, rng: np.random.Generator
) -> Floats:
    """Posterior samples of each arm's mean, shape (draws, arms).

    Bernoulli: Beta(1 + s, 1 + n - s), the uniform-prior posterior. Gaussian:
    Normal(mean, s²/n), the large-sample posterior under a flat prior. An arm
    with fewer than two units borrows the pooled variance of the others (or 1
    when there is none) and, with no units, the pooled mean, so it is drawn
    widely rather than dropped.
    """
    k = len(arms)
    if kind == "bernoulli":
        s = np.array([min(max(a.successes, 0.0), a.n) for a in arms])
        n = np.array([a.n for a in arms])
        return rng.beta(1.0 + s, 1.0 + n - s, size=(draws, k))
    if kind != "gaussian":
        raise ValueError(f"kind must be 'bernoulli' or 'gaussian', got {kind!r}")
    n = np.array([a.n for a in arms], dtype=np.float64)
    sums = np.array([a.sum for a in arms], dtype=np.float64)
    sumsq = np.array([a.sumsq for a in arms], dtype=np.float64)
    has_var = n >= 2
    var = np.ones(k)
    var[has_var] = np.maximum(
        (sumsq[has_var] - sums[has_var] ** 2 / n[has_var]) / (n[has_var] - 1.0), 0.0
    )
    pooled_var = float(np.average(var[has_var], weights=n[has_var] - 1.0)) if has_var.any() else 1.0
    var[~has_var] = pooled_var if pooled_var > 0 else 1.0
    total = n.sum()
    pooled_mean = float(sums.sum() / total) if total > 0 else 0.0
    mean = np.full(k, pooled_mean)
    seen = n > 0
    mean[seen] = sums[seen] / n[seen]
    scale = np.sqrt(var / np.maximum(n, 1.0))
    return rng.normal(mean, scale, size=(draws, k))


def _win_shares(samples: Floats) -> Floats:
    """Fraction of draws in which each column is the largest; ties share the credit."""
    is_max = samples == samples.max(axis=1, keepdims=True)
    credit = is_max / is_max.sum(axis=1, keepdims=True)
    shares: Floats = credit.mean(axis=0)
    return shares


def _draws(
    arms: Sequence[ArmStats],
    kind: BanditKind,
    higher_is_better: bool,
    draws: int,
    rng: np.random.Generator | None,
) -> Floats:
    _check_arms(arms)
    if draws < 1:
        raise ValueError(f"draws must be positive, got {draws}")
    samples = _posterior_draws(arms, kind, draws, rng or np.random.default_rng())
    return samples if higher_is_better else -samples


def probability_best(
    arms: Sequence[ArmStats],
    *,
    kind: BanditKind = "bernoulli",
    higher_is_better: bool = True,
    draws: int = 10_000,
    rng: np.random.Generator | None = None,
) -> dict[str, float]:
    """Monte-Carlo posterior probability that each arm has the best mean."""
    samples = _draws(arms, kind, higher_is_better, draws, rng)
    return {a.name: float(p) for a, p in zip(arms, _win_shares(samples), strict=True)}


def _top_two(samples: Floats, pi: Floats, beta: float) -> Floats:
    """Expected top-two Thompson allocation (Russo 2016) from posterior draws.

    The leader I is the best arm of a posterior draw (probability pi_I); with
    probability beta it is played, otherwise draws are repeated until another
    arm J is best, which happens with probability pi_J / (1 - pi_I). When the
    leader wins (almost) every draw that resampling would never end; the
    runner-up within the leader's draws is used as the challenger instead.
    """
    k = pi.size
    challenger = np.zeros((k, k))  # row: leader, column: challenger probability
    for i in range(k):
        if pi[i] <= 0:
            continue
        others = np.delete(np.arange(k), i)
        rest = 1.0 - pi[i]
        if rest * samples.shape[0] >= 1.0:
            challenger[i, others] = pi[others] / rest
        else:
            challenger[i, others] = _win_shares(samples[:, others])
    allocation: Floats = beta * pi + (1.0 - beta) * (pi @ challenger)
    return allocation


def _apply_floor(shares: Floats, floor: float) -> Floats:
    """Raise every share to at least ``floor`` and take the mass from the others proportionally."""
    k = shares.size
    out: Floats = shares / shares.sum()
    if floor <= 0:
        return out
    if floor * k >= 1.0:
        return np.full(k, 1.0 / k)
    pinned = np.zeros(k, dtype=bool)
    for _ in range(k):
        pinned |= out < floor
        free = ~pinned
        free_mass = out[free].sum()
        out[pinned] = floor
        budget = 1.0 - floor * pinned.sum()
        if free_mass > 0:
            out[free] = out[free] * budget / free_mass
        else:
            out[free] = budget / free.sum()
        if not np.any(out[free] < floor):
            break
    return out


def thompson_allocation(
    arms: Sequence[ArmStats],
    *,
    kind: BanditKind = "bernoulli",
    higher_is_better: bool = True,
    top_two: bool = False,
    top_two_beta: float = 0.5,
    floor: float = 0.01,
    min_units: int = 100,
    draws: int = 10_000,
    rng: np.random.Generator | None = None,
) -> dict[str, float]:
    """Traffic shares for the arms, summing to 1.

    Equal shares until every arm has ``min_units`` units (GrowthBook waits for
    100); then each arm's posterior probability of being best (Thompson
    sampling) or the top-two Thompson allocation with parameter
    ``top_two_beta``. Every arm keeps at least ``floor`` of the traffic
    (GrowthBook: 1%) so that it can still be measured; if the floors cannot
    all be met the split is equal.
    """
    _check_arms(arms)
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be in [0, 1], got {floor!r}")
    if not 0.0 < top_two_beta < 1.0:
        raise ValueError(f"top_two_beta must be in (0, 1), got {top_two_beta!r}")
    k = len(arms)
    if k == 1 or any(a.n < min_units for a in arms):
        return {a.name: 1.0 / k for a in arms}
    samples = _draws(arms, kind, higher_is_better, draws, rng)
    pi = _win_shares(samples)
    shares = _top_two(samples, pi, top_two_beta) if top_two else pi
    shares = _apply_floor(shares, floor)
    return {a.name: float(s) for a, s in zip(arms, shares, strict=True)}
