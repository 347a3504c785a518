"""Bandit experiments: several candidates share a stage's candidate traffic.

In a stage with ``experiment:``, the candidate and the plan's challengers compete. Each tick
the controller re-allocates the stage's candidate traffic by Thompson sampling (or top-two
Thompson sampling) on the objective metric, with a floor per arm and equal shares until every
arm has ``min_units`` observations. Allocation steers traffic only: guardrail decisions stay on
the always-valid per-arm tests against the baseline (each arm's sums are martingales under any
predictable allocation, so the confidence sequences keep their coverage, while the naive
per-arm means of an adaptive design are biased — arXiv 1905.11397). An arm with proven harm is
dropped; the stage ends when one arm is best with the plan's confidence and passes every
guardrail, and that arm is the candidate for the rest of the rollout.

State lives in the rollout's state: ``allocation`` (arm → share of the candidate traffic),
``dropped`` (arms removed for harm) and ``winner`` (:class:`~safeshift.state.RolloutState`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from safeshift._units import BASIS_POINTS
from safeshift.assign import CANDIDATE
from safeshift.plan import BUILTIN_METRICS, Direction, Experiment, Plan
from safeshift.state import RolloutState
from safeshift.stats import ArmStats, probability_best, thompson_allocation
from safeshift.telemetry import Summary

REALLOCATE_STEP = 0.01
"""Allocation changes smaller than this (share of candidate traffic) are not written."""


def experiment_of(plan: Plan, state: RolloutState) -> Experiment | None:
    i = state.stage_index
    if 0 <= i < len(plan.stages):
        return plan.stages[i].experiment
    return None


def current_variants(plan: Plan, state: RolloutState) -> list[str]:
    """The candidate variants that serve in this state: the arms still in the experiment, or
    the winner (``candidate`` unless an experiment chose a challenger)."""
    if experiment_of(plan, state) is not None and state.winner is None:
        dropped = set(state.dropped)
        return [v for v in plan.variants if v not in dropped]
    return [CANDIDATE if state.winner is None else state.winner]


def allocation(plan: Plan, state: RolloutState) -> dict[str, float]:
    """Share of the candidate traffic per serving variant (equal until the first update)."""
    variants = current_variants(plan, state)
    stored: Mapping[str, float] = state.allocation or {}
    shares = {v: float(stored.get(v, 0.0)) for v in variants}
    total = sum(shares.values())
    if total <= 0:
        return {v: 1.0 / len(variants) for v in variants}
    return {v: s / total for v, s in shares.items()}


def variant_split(plan: Plan, state: RolloutState) -> tuple[tuple[str, str, int], ...]:
    """(name, version, cumulative basis points) for :class:`~safeshift.assign.Split`."""
    shares = allocation(plan, state)
    out = []
    upper = 0.0
    names = list(shares)
    for k, name in enumerate(names):
        upper += shares[name] * BASIS_POINTS
        bound = BASIS_POINTS if k == len(names) - 1 else round(upper)
        out.append((name, plan.variant(name).version, bound))
    return tuple(out)


def _higher_is_better(exp: Experiment) -> bool:
    bad = exp.direction or (BUILTIN_METRICS[exp.objective].bad
                            if exp.objective in BUILTIN_METRICS else Direction.DECREASE)
    return bad is Direction.DECREASE


def arm_stats(exp: Experiment, summary: Summary, variants: list[str]) -> list[ArmStats]:
    out = []
    for v in variants:
        m = summary.total(v, exp.objective)
        out.append(ArmStats(v, m.n, successes=m.s, sum=m.s, sumsq=m.ss))
    return out


def _is_rate(exp: Experiment) -> bool:
    info = BUILTIN_METRICS.get(exp.objective)
    return bool(info and info.rate)


def _rng(plan: Plan, state: RolloutState, now: float) -> np.random.Generator:
    digest = hashlib.sha256(f"{plan.rollout}/{state.version}/{now:.3f}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def new_allocation(plan: Plan, state: RolloutState, summary: Summary,
                   now: float) -> dict[str, float]:
    """Thompson (or top-two) allocation over the arms still in the experiment."""
    exp = experiment_of(plan, state)
    assert exp is not None
    variants = current_variants(plan, state)
    if len(variants) == 1:
        return {variants[0]: 1.0}
    return thompson_allocation(
        arm_stats(exp, summary, variants), kind="bernoulli" if _is_rate(exp) else "gaussian",
        higher_is_better=_higher_is_better(exp), top_two=exp.method == "top_two",
        floor=exp.floor / BASIS_POINTS, min_units=exp.min_units, rng=_rng(plan, state, now))


def best_arm(plan: Plan, state: RolloutState, summary: Summary,
             now: float) -> tuple[str, float, dict[str, float]]:
    """The arm most likely best on the objective, that probability, and all of them."""
    exp = experiment_of(plan, state)
    assert exp is not None
    variants = current_variants(plan, state)
    if len(variants) == 1:
        return variants[0], 1.0, {variants[0]: 1.0}
    stats = arm_stats(exp, summary, variants)
    if min(a.n for a in stats) < exp.min_units:
        even = {v: 1.0 / len(variants) for v in variants}
        return variants[0], 1.0 / len(variants), even
    probs = probability_best(stats, kind="bernoulli" if _is_rate(exp) else "gaussian",
                             higher_is_better=_higher_is_better(exp), rng=_rng(plan, state, now))
    best = max(probs, key=lambda k: probs[k])
    return best, probs[best], probs


def moved(old: Mapping[str, float], new: Mapping[str, float]) -> bool:
    keys = set(old) | set(new)
    return any(abs(old.get(k, 0.0) - new.get(k, 0.0)) >= REALLOCATE_STEP for k in keys)
