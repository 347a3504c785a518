"""``safeshift bench decisions``: rollout decisions against the methods people use today.

A seeded Monte-Carlo on a virtual clock. Each simulated rollout is one canary stage of a real
:class:`~safeshift.Plan` (50 % of 50 requests/s on the candidate, guardrails ``error_rate``
± 0.2 pt and the share of ``latency_ms`` above 250 ms ± 1 pt, ten countries as segments,
alpha 0.05, default analysis settings). Every 10 virtual seconds the per-arm, per-country
counts of the last interval are drawn (vectorised over runs) and every method looks at the
*same* traffic:

``safeshift``
    the decision engine with the plan's settings — the same for every scenario — and the
    controller's rule: roll back on any ``HARM`` verdict (global or segment), pause on a
    sample-ratio mismatch, promote when every global verdict passes and ``min_samples`` and
    ``min_duration`` are met, stop undecided at ``max_duration``. The verdicts come from a
    vectorised copy of :func:`safeshift.analysis.analyse` (same formulas, same alpha sharing,
    same order of floating-point operations), checked against the real ``analyse`` at every
    look of the first runs of each scenario and by ``tests/bench/test_decisions.py``.
``naive``
    the same hypotheses (harm beyond the tolerance) with a fixed-sample one-sided z-test at
    alpha 0.05 per guardrail, repeated at every look: roll back on the first significant
    harm, promote at the end of the horizon.
``threshold``
    Flagger-like: every 1-minute interval, a guardrail fails its check when the candidate's
    interval rate exceeds the baseline's by more than the tolerance; roll back after one
    failed check, promote at the end of the horizon.
``mannwhitney``
    Kayenta-like: every 1-minute interval, a Mann-Whitney U test on the per-request 0/1
    values (two-sided, confidence 0.98); a guardrail is classified *high* — a failure —
    when the candidate is significantly higher and its mean exceeds the baseline's by more
    than the 0.25 effect tolerance. Kayenta bounds the Hodges-Lehmann shift instead, which
    is 0 for rare 0/1 events, so it would never fail at all; the mean ratio is the
    ``ratio`` Kayenta reports. Roll back on the first failure, promote at the horizon.
``oracle``
    Wald's SPRT (alpha = beta = 0.05), request by request, on the one stream the scenario
    changes, between the true state and the harmful state: H0 = no change and H1 = the true
    effect when the change is harmful; H0 = the true state and H1 = the harmful alternative
    (error rate 1 % → 2 %) when it is not. Accepting H1 rolls back, accepting H0 promotes.
    It knows the baseline rate and the effect, so no test with the same error rates needs
    fewer samples on average (Wald & Wolfowitz 1948). Within a 10-second look the requests
    come in a random order consistent with the look's counts.

The horizon of the three baselines is the fixed-horizon sample size a practitioner would plan
for the tightest guardrail (one-sided alpha 0.05, power 0.8, margin = tolerance), rounded up
to whole 1-minute checks. Samples are candidate + baseline requests at the decision.

On *clustered* traffic (:mod:`safeshift.bench._clustered`: a population of users per
rollout, heavy-tailed requests per user, per-user error, latency and accuracy propensities)
the same methods and ``safeshift_requests`` — the engine on the same telemetry without unit
clusters — are compared again, with the engine's standard error against the Monte-Carlo one
and the best any test could do by ``max_duration`` (JSON section ``clustered``).

Besides the five methods the JSON carries ``reference`` figures: the textbook peeking
experiment (``naive_no_tolerance``: a z-test of any difference at every look), the SPRT of
the hypothesis safeshift actually tests (``oracle_at_tolerance``: H0 harm = tolerance), the
SPRT at the least favourable point of that null with the baseline rate unknown
(``sprt_least_favourable``, summarised with Wald's bound on the mean samples of any test
with safeshift's guarantee as ``harm_lower_bound``), and, on the harmful scenario, the engine's error-rate
rule with its guarantees added one at a time (``harm_cost_breakdown``), which shows where its
samples to a rollback go.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
from numpy.typing import NDArray
from rich import box
from rich.console import Console
from rich.table import Table
from scipy import optimize, special

from safeshift._units import BASIS_POINTS
from safeshift.analysis import MIN_GLOBAL_SAMPLES, REQUESTS, Status, analyse, tuning_samples
from safeshift.assign import BASELINE, CANDIDATE
from safeshift.plan import Direction, Plan
from safeshift.stats import fixed_horizon_samples_per_arm, mixture_rho2, srm_log_bayes_factor
from safeshift.telemetry import Moments, Summary

__all__ = [
    "METHODS",
    "SCENARIOS",
    "EngineSpec",
    "Scenario",
    "bench_plan",
    "engine_statuses",
    "main",
    "mann_whitney_p",
    "segment_alpha",
    "simulate",
]

Array = NDArray[np.float64]
Mask = NDArray[np.bool_]

METHODS = ("safeshift", "naive", "threshold", "mannwhitney", "oracle")

RATE = 50.0
"""Requests per second reaching the endpoint."""
LOOK = 10.0
"""Seconds between controller ticks (looks)."""
CHECK = 60.0
"""Seconds per Flagger/Kayenta check interval."""
TRAFFIC = "50%"
MIN_DURATION = "10m"
MAX_DURATION = "2h"
MIN_SAMPLES = 1000
BASE_RATE = 0.01
"""Baseline error rate and share of requests slower than 250 ms, in every country."""
COUNTRIES: tuple[tuple[str, float], ...] = (
    ("US", 0.30), ("IN", 0.15), ("BR", 0.10), ("DE", 0.10), ("GB", 0.08),
    ("FR", 0.07), ("JP", 0.06), ("MX", 0.05), ("CA", 0.05), ("AU", 0.04),
)
HARM_COUNTRY = "BR"
SEGMENT_ATTRIBUTE = "country"
KAYENTA_TOLERANCE = 0.25
KAYENTA_CONFIDENCE = 0.98
SPRT_ALPHA = 0.05
SPRT_BETA = 0.05
ORACLE_RATIO_TARGET = 2.5

# verdict codes of the vectorised engine
NO_DATA, HOLD, PASS, HARM = 0, 1, 2, 3
STATUS_CODES = {Status.NO_DATA: NO_DATA, Status.HOLD: HOLD, Status.PASS: PASS, Status.HARM: HARM}

# outcome codes
RUNNING, ROLLBACK, PROMOTE, INCONCLUSIVE, PAUSED = 0, 1, 2, 3, 4

# the absolute floor analyse() puts under its relative srm_min_deviation
SRM_MIN_DEVIATION = 0.002
SRM_MIN_COUNT = 8


def bench_plan(*, accuracy: bool = False) -> Plan:
    """The plan every scenario runs: one canary stage, two guardrails, countries as segments;
    with ``accuracy`` also an accuracy guardrail on feedback labels (± 1 pt)."""
    guardrails: list[dict[str, Any]] = [
        {"metric": "error_rate", "tolerance": 0.002},
        {"metric": "latency_ms", "above": 250, "tolerance": 0.01},
    ]
    if accuracy:
        guardrails.append({"metric": "accuracy", "tolerance": 0.01})
    return Plan.from_dict({
        "rollout": "bench-decisions",
        "endpoint": "bench",
        "baseline": {"version": "v1", "model": "fake:baseline"},
        "candidate": {"version": "v2", "model": "fake:candidate"},
        "change": {"summary": "decision benchmark"},
        "segments": [SEGMENT_ATTRIBUTE],
        "stages": [{"name": "canary", "traffic": TRAFFIC, "min_samples": MIN_SAMPLES,
                    "min_duration": MIN_DURATION, "max_duration": MAX_DURATION}],
        "guardrails": guardrails,
        "analysis": {"alpha": 0.05},
    })


@dataclass(frozen=True, slots=True)
class Scenario:
    """True per-request rates of each signal (error, latency > 250 ms) on each arm."""

    name: str
    title: str
    candidate: tuple[float, float]
    segment_candidate: tuple[float, float] | None = None  # HARM_COUNTRY's candidate rates
    oracle_signal: int = 0
    oracle_segment: str | None = None
    oracle_h0: float = BASE_RATE
    oracle_h1: float = 2 * BASE_RATE
    harmful: bool = False


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("aa", "identical models (A/A)", (BASE_RATE, BASE_RATE)),
    Scenario("harmful", "error rate 1% → 2%", (0.02, BASE_RATE), harmful=True,
             oracle_h1=0.02),
    Scenario("within_tolerance", "error rate +0.1 pt (tolerance 0.2 pt)", (0.011, BASE_RATE),
             oracle_h0=0.011),
    Scenario("segment_harm", f"{HARM_COUNTRY} (10% of traffic): error rate 1% → 5%",
             (BASE_RATE, BASE_RATE), segment_candidate=(0.05, BASE_RATE), harmful=True,
             oracle_segment=HARM_COUNTRY, oracle_h1=0.05),
    Scenario("latency", "share over 250 ms 1% → 3%", (BASE_RATE, 0.03), harmful=True,
             oracle_signal=1, oracle_h1=0.03),
    # the worst case of both guarantees: neither a rollback nor a promotion is warranted
    Scenario("at_tolerance", "both guardrails exactly at their tolerance (+0.2 pt, +1 pt)",
             (0.012, 0.02), oracle_h0=0.012),
)


# -- the engine, vectorised ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """What :func:`safeshift.analysis.analyse` and the controller use for one canary stage of
    absolute-tolerance rate guardrails (higher or lower worse) with one segment attribute."""

    signals: tuple[str, ...]
    tolerances: tuple[float, ...]
    strict: tuple[bool, ...]
    segmented: tuple[bool, ...]
    signs: tuple[float, ...]  # +1 when higher is worse, -1 when lower is worse (accuracy)
    n_star: float
    alpha: float
    alpha_global: float
    alpha_segments: float  # (alpha/2) / segmented guardrails: spread over values by weight
    segment_min: float
    share: float
    srm_alpha: float
    srm_min_deviation: float
    min_samples: float
    min_duration: float
    max_duration: float

    @classmethod
    def from_plan(cls, plan: Plan, stage_index: int, n_segments: int) -> EngineSpec:
        stage = plan.stages[stage_index]
        guardrails = plan.guardrails_for(stage)
        for g in guardrails:
            info = g.info
            if not info.rate or g.is_bound or g.relative_tolerance is not None:
                raise ValueError(f"the vectorised engine covers absolute-tolerance rate "
                                 f"guardrails, not {g.describe()!r}")
        if stage.is_shadow or not 0 < stage.traffic < BASIS_POINTS or len(plan.segments) != 1:
            raise ValueError("the vectorised engine covers one canary stage and one segment "
                             "attribute")
        # alpha sharing exactly as in analyse(); each segment value's part of alpha_segments
        # follows the baseline's requests at every look (segment_alpha)
        alpha = plan.analysis.alpha
        segmented = sum(1 for g in guardrails if g.segments)
        k = max(len(guardrails), 1)
        alpha_global = (alpha / 2 if segmented and n_segments else alpha) / k
        return cls(
            signals=tuple(g.key for g in guardrails),
            tolerances=tuple(float(g.tolerance or 0.0) for g in guardrails),
            strict=tuple(g.strict for g in guardrails),
            segmented=tuple(g.segments for g in guardrails),
            signs=tuple(1.0 if g.info.bad is Direction.INCREASE else -1.0 for g in guardrails),
            n_star=tuning_samples(plan, stage),
            alpha=alpha,
            alpha_global=alpha_global,
            alpha_segments=(alpha / 2) / max(segmented, 1),
            segment_min=float(plan.analysis.segment_min_samples),
            share=stage.traffic / BASIS_POINTS,
            srm_alpha=plan.analysis.srm_alpha,
            srm_min_deviation=max(SRM_MIN_DEVIATION, plan.analysis.srm_min_deviation
                                  * min(stage.traffic, BASIS_POINTS - stage.traffic)
                                  / BASIS_POINTS),
            min_samples=float(stage.min_samples),
            min_duration=stage.min_duration,
            max_duration=float(stage.max_duration or math.inf),
        )


def segment_alpha(spec: EngineSpec, baseline_requests: Array,
                  present: Mask | None = None) -> Array:
    """The harm alpha of each segment test, ``[..., value]``, as analyse() spends it:
    :func:`safeshift.analysis.segment_weights` of the baseline's requests per value, elementwise
    (same operations in the same order). ``present`` marks the values that have telemetry; the
    others get no test (NaN)."""
    if present is None:
        present = np.ones(baseline_requests.shape, bool)
    n = np.where(present, np.maximum(baseline_requests, 0.0), 0.0)
    k = present.sum(axis=-1, keepdims=True).astype(np.float64)
    total = n.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(total > 0, n / total, 1.0 / k)
        weight = (0.5 * share + 0.5 / k) / 1  # one segment attribute
    segmented = sum(spec.segmented)
    alpha: Array = np.where(present, (spec.alpha / 2) * weight / max(segmented, 1), np.nan)
    return alpha


def _multiplier(n: Array, n_star: float, alpha: float | Array) -> Array:
    """:func:`safeshift.stats.boundary_multiplier` (one-sided), elementwise (also in alpha)."""
    if isinstance(alpha, float):
        rho2: float | Array = mixture_rho2(n_star, alpha, one_sided=True)
    else:
        with np.errstate(invalid="ignore"):
            log_a = np.log(2.0 * np.asarray(alpha))
            rho2 = (-2.0 * log_a + np.log(1.0 - 2.0 * log_a)) / n_star
    with np.errstate(divide="ignore", invalid="ignore"):
        r = rho2 * n
        m2 = 2.0 * (1.0 + 1.0 / r) * np.log1p(np.sqrt(1.0 + r) / (2.0 * alpha))
        m = np.sqrt(m2)
    out: Array = np.where(n > 0, m, np.inf)
    return out


def _compare(nb: Array, xb: Array, nc: Array, xc: Array, *, tol: float, strict: bool,
             n_star: float, alpha_harm: float | Array, alpha_pass: float, min_n: float,
             sign: float = 1.0, cluster_var: tuple[Array, Array] | None = None,
             known_baseline: float | None = None) -> NDArray[np.int8]:
    """Verdict codes of :func:`safeshift.analysis.compare` for rate guardrails, elementwise.

    ``sign`` is -1 for a metric where lower is worse. ``cluster_var`` holds each arm's
    cluster-robust variance (``inf`` below two clusters): the standard error is then the larger
    of the unit-level and the Agresti-Caffo one, and the boundary's time is scaled by their
    squared ratio, as in ``analysis._clustered_se``. ``known_baseline`` (for the cost breakdown
    only) replaces the baseline arm by its true rate: a one-sample comparison, on the same time
    scale as a bound (4·n_c)."""
    _, _, status = _compare_se(nb, xb, nc, xc, tol=tol, strict=strict, n_star=n_star,
                                alpha_harm=alpha_harm, alpha_pass=alpha_pass, min_n=min_n,
                                sign=sign, cluster_var=cluster_var,
                                known_baseline=known_baseline)
    return status


def _compare_se(nb: Array, xb: Array, nc: Array, xc: Array, *, tol: float, strict: bool,
                n_star: float, alpha_harm: float | Array, alpha_pass: float, min_n: float,
                sign: float = 1.0, cluster_var: tuple[Array, Array] | None = None,
                known_baseline: float | None = None) -> tuple[Array, Array, NDArray[np.int8]]:
    """:func:`_compare` with the standard error the bounds used and the difference c - b."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        qc = (xc + 1) / (nc + 2)
        vc = np.maximum(qc * (1.0 - qc), 0.0)
        if known_baseline is None:
            diff = xc / nc - xb / nb
            qb = (xb + 1) / (nb + 2)
            vb = np.maximum(qb * (1.0 - qb), 0.0)
            se = np.sqrt(vc / (nc + 2) + vb / (nb + 2))
            n_eff = np.where((nb > 0) & (nc > 0), 4.0 * nb * nc / (nb + nc), 0.0)
            no_data = (nb < min_n) | (nc < min_n)
        else:
            diff = xc / nc - known_baseline
            se = np.sqrt(vc / (nc + 2))
            n_eff = 4.0 * nc
            no_data = nc < min_n
        if cluster_var is not None:
            iid_se = se
            se = np.maximum(np.sqrt(cluster_var[0] + cluster_var[1]), iid_se)
            factor = np.where((se > 0) & (se < np.inf) & np.isfinite(iid_se),
                              (iid_se / se) ** 2, 1.0)
            n_eff = n_eff * factor
        harm = sign * diff
        harm_lo = harm - _multiplier(n_eff, n_star, alpha_harm) * se
        harm_hi = harm + _multiplier(n_eff, n_star, alpha_pass) * se
    status = np.where(harm_lo > (0.0 if strict else tol), HARM,
                      np.where(harm_hi < tol, PASS, HOLD))
    out: NDArray[np.int8] = np.where(no_data, NO_DATA, status).astype(np.int8)
    return se, diff, out


@dataclass(slots=True)
class EngineVerdicts:
    """Verdict codes: ``overall[run, guardrail]``, ``segments[run, segment, guardrail]``."""

    overall: NDArray[np.int8]
    segments: NDArray[np.int8]
    srm_mismatch: Mask


def engine_statuses(spec: EngineSpec, n: Array, x: Array) -> EngineVerdicts:
    """``analyse()`` for many runs at once from cumulative counts ``n[run, arm, segment]``
    (requests; arm 0 baseline, 1 candidate) and ``x[run, arm, segment, guardrail]`` (events)."""
    runs, _, n_seg = n.shape
    n_g = len(spec.signals)
    nb_all, nc_all = n[:, 0].sum(axis=1), n[:, 1].sum(axis=1)
    xb_all, xc_all = x[:, 0].sum(axis=1), x[:, 1].sum(axis=1)
    overall = np.empty((runs, n_g), dtype=np.int8)
    segments = np.full((runs, n_seg, n_g), NO_DATA, dtype=np.int8)
    alpha_seg = segment_alpha(spec, n[:, 0])
    for j in range(n_g):
        tol, strict, sign = spec.tolerances[j], spec.strict[j], spec.signs[j]
        overall[:, j] = _compare(nb_all, xb_all[:, j], nc_all, xc_all[:, j], tol=tol,
                                 strict=strict, n_star=spec.n_star, alpha_harm=spec.alpha_global,
                                 alpha_pass=spec.alpha, min_n=MIN_GLOBAL_SAMPLES, sign=sign)
        if spec.segmented[j]:
            segments[:, :, j] = _compare(n[:, 0], x[:, 0, :, j], n[:, 1], x[:, 1, :, j], tol=tol,
                                         strict=strict, n_star=spec.n_star,
                                         alpha_harm=alpha_seg, alpha_pass=spec.alpha,
                                         min_n=spec.segment_min, sign=sign)
    return EngineVerdicts(overall, segments, _srm_mismatch(spec, nb_all, nc_all))


def _srm_mismatch(spec: EngineSpec, nb: Array, nc: Array) -> Mask:
    """``srm_test(...).mismatch`` as analyse() calls it, elementwise."""
    counts = np.stack([nb, nc], axis=-1)
    expected = np.array([1 - spec.share, spec.share])
    expected = expected / expected.sum()
    log_bf = srm_log_bayes_factor(counts, [1 - spec.share, spec.share])
    with np.errstate(over="ignore"):
        p_value = np.where(log_bf <= 0, 1.0, np.exp(-np.maximum(log_bf, 0.0)))
    total = counts.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        observed = np.where(total > 0, counts / total, 0.0)
    deviation = np.abs(observed - expected).max(axis=-1)
    enough = (counts >= SRM_MIN_COUNT).all(axis=-1)
    out: Mask = (p_value < spec.srm_alpha) & (deviation >= spec.srm_min_deviation) & enough
    return out


def summary_from_counts(spec: EngineSpec, countries: Sequence[str], n: Array,
                        x: Array) -> Summary:
    """Telemetry cells for one run, as the store would hand them to ``analyse()``."""
    summary = Summary()
    for a, arm in enumerate((BASELINE, CANDIDATE)):
        for s, country in enumerate(countries):
            cell = {REQUESTS: Moments(float(n[a, s]), float(n[a, s]), float(n[a, s]))}
            for j, signal in enumerate(spec.signals):
                v = float(x[a, s, j])
                cell[signal] = Moments(float(n[a, s]), v, v)
            summary.cells[(arm, "hash", f"{SEGMENT_ATTRIBUTE}={country}", -1)] = cell
    return summary


def check_against_analyse(plan: Plan, spec: EngineSpec, countries: Sequence[str], n: Array,
                          x: Array, fast: EngineVerdicts, row: int) -> int:
    """Mismatches between the vectorised verdicts of ``row`` and the real ``analyse()``."""
    result = analyse(plan, 0, summary_from_counts(spec, countries, n[row], x[row]))
    index = {signal: j for j, signal in enumerate(spec.signals)}
    mismatches = 0
    for v in result.verdicts:
        j = index[v.guardrail]
        if v.segment is None:
            code = fast.overall[row, j]
        else:
            code = fast.segments[row, list(countries).index(v.segment.split("=", 1)[1]), j]
        mismatches += int(STATUS_CODES[v.status] != code)
    srm = result.srm.mismatch if result.srm is not None else False
    return mismatches + int(srm != bool(fast.srm_mismatch[row]))


# -- the baselines ---------------------------------------------------------------------------


def mann_whitney_p(k1: Array, n1: Array, k2: Array, n2: Array) -> Array:
    """Two-sided Mann-Whitney U p-value of two samples of 0/1 values (``k`` ones out of
    ``n``), with the tie correction and continuity correction of
    ``scipy.stats.mannwhitneyu(method="asymptotic")``; NaN when every value is tied."""
    with np.errstate(divide="ignore", invalid="ignore"):
        u1 = k1 * (n2 - k2) + 0.5 * (k1 * k2 + (n1 - k1) * (n2 - k2))
        u = np.maximum(u1, n1 * n2 - u1)
        n = n1 + n2
        ones, zeros = k1 + k2, n - k1 - k2
        tie_term = ones**3 - ones + zeros**3 - zeros
        s = np.sqrt(n1 * n2 / 12 * ((n + 1) - tie_term / (n * (n - 1))))
        z = (u - n1 * n2 / 2 - 0.5) / s
        p: Array = np.clip(2 * special.ndtr(-z), 0, 1)
    return np.where(s > 0, p, np.nan)


@dataclass(slots=True)
class Outcome:
    """Per-run decision, samples and virtual seconds of one method in one scenario."""

    code: NDArray[np.int8]
    samples: Array
    seconds: Array

    @classmethod
    def empty(cls, runs: int) -> Outcome:
        return cls(np.zeros(runs, np.int8), np.full(runs, np.nan), np.full(runs, np.nan))

    def decide(self, which: Mask, code: int, samples: Array | float,
               seconds: Array | float) -> None:
        which = which & (self.code == RUNNING)
        self.code[which] = code
        self.samples[which] = samples if np.isscalar(samples) else np.asarray(samples)[which]
        self.seconds[which] = seconds if np.isscalar(seconds) else np.asarray(seconds)[which]

    @property
    def running(self) -> Mask:
        out: Mask = self.code == RUNNING
        return out


class _Sprt:
    """Wald's SPRTs (alpha = beta = 0.05), request by request, sharing the within-look order.

    Each look brings per-run counts of a few request categories (say candidate error,
    candidate success, baseline error, baseline success, everything else); the requests of a
    look come in a random order consistent with those counts, and each probe adds its own
    log-likelihood-ratio increment per category."""

    def __init__(self, runs: int, probes: Sequence[Sequence[float]]) -> None:
        self.increments = [np.asarray(p, dtype=np.float64) for p in probes]
        self.upper = math.log((1 - SPRT_BETA) / SPRT_ALPHA)
        self.lower = math.log(SPRT_BETA / (1 - SPRT_ALPHA))
        self.llr = [np.zeros(runs) for _ in probes]
        self.outcomes = [Outcome.empty(runs) for _ in probes]

    def look(self, rng: np.random.Generator, counts: NDArray[np.int64], t0: float,
             before: float | Array, *, pad: bool = False, seconds: float = LOOK) -> None:
        """``counts[run, category]`` of this look's requests (``seconds`` long); every run's
        look has the same number of requests, unless ``pad``: then runs are padded to the
        largest count with requests that do not exist (time slots without a request) and
        ``before`` gives each run's requests before the look."""
        active = np.flatnonzero(np.logical_or.reduce([o.running for o in self.outcomes]))
        if active.size == 0:
            return
        cc = counts[active]
        width = int(cc.sum(axis=1).max())
        if width == 0:
            return
        if pad:
            cc = np.concatenate([cc, width - cc.sum(axis=1, keepdims=True)], axis=1)
        ranks = rng.random((active.size, width)).argsort(axis=1).argsort(axis=1)
        ends = np.cumsum(cc, axis=1)
        category = (ranks[:, :, None] >= ends[:, None, :-1]).sum(axis=2)
        real = np.cumsum(category != cc.shape[1] - 1, axis=1) if pad else None
        for inc, llr, out in zip(self.increments, self.llr, self.outcomes, strict=True):
            steps = np.append(inc, 0.0) if pad else inc
            path = llr[active, None] + np.cumsum(steps[category], axis=1)
            up, lo = path >= self.upper, path <= self.lower
            first_up = np.where(up.any(axis=1), up.argmax(axis=1), width)
            first_lo = np.where(lo.any(axis=1), lo.argmax(axis=1), width)
            first = np.minimum(first_up, first_lo)
            hit = (first < width) & out.running[active]
            frac = (first + 1) / width
            samples = np.zeros(out.code.size)
            times = np.zeros(out.code.size)
            if real is None:
                samples[active] = np.ceil(before + frac * width)
            else:
                at = real[np.arange(active.size), np.minimum(first, width - 1)]
                samples[active] = np.asarray(before)[active] + at
            times[active] = t0 + frac * seconds
            for code, cond in ((ROLLBACK, first_up < first_lo), (PROMOTE, first_lo < first_up)):
                sel = np.zeros(out.code.size, bool)
                sel[active[hit & cond]] = True
                out.decide(sel, code, samples, times)
            llr[active] = path[:, -1]


def _bernoulli_llr(p0: float, p1: float) -> tuple[float, float]:
    """Log-likelihood-ratio increments of H1: rate p1 against H0: rate p0 for (event, none)."""
    return math.log(p1 / p0), math.log((1 - p1) / (1 - p0))


def _bernoulli_kl(p: float, q: float) -> float:
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def _kl_to_null(p_b: float, p_c: float, tol: float, share: float, q: float) -> float:
    """KL divergence per request from the truth (p_b, p_c) to the null point (q, q + tol)."""
    return share * _bernoulli_kl(p_c, q + tol) + (1 - share) * _bernoulli_kl(p_b, q)


def least_favourable_null(p_b: float, p_c: float, tol: float, share: float) -> float:
    """The baseline rate q of the point (q, q + tol) of the null "harm ≤ tol" closest to the
    truth (p_b, p_c) in Kullback-Leibler divergence per request, at candidate ``share``: the
    point a test that must keep false rollbacks ≤ alpha everywhere in the null finds hardest
    to tell from the truth (Lai 1988)."""
    res = optimize.minimize_scalar(lambda q: _kl_to_null(p_b, p_c, tol, share, q),
                                   bounds=(1e-9, 1 - tol - 1e-9), method="bounded",
                                   options={"xatol": 1e-12})
    return float(res.x)


@dataclass(slots=True)
class ScenarioResult:
    outcomes: dict[str, Outcome]
    segment_named: Mask
    references: dict[str, Outcome] = field(default_factory=dict)
    engine_checks: int = 0
    engine_mismatches: int = 0


def baseline_horizon(spec: EngineSpec) -> float:
    """Seconds a fixed-horizon test of the tightest guardrail would be planned for."""
    variance = BASE_RATE * (1 - BASE_RATE)
    per_arm = max(fixed_horizon_samples_per_arm(variance, tol, alpha=0.05, power=0.8)
                  for tol in spec.tolerances)
    seconds = per_arm / (RATE * min(spec.share, 1 - spec.share))
    return math.ceil(seconds / CHECK) * CHECK


def simulate(plan: Plan, scenario: Scenario, runs: int, rng: np.random.Generator, *,
             verify: int = 0) -> ScenarioResult:
    """Run ``runs`` rollouts of ``scenario`` with every method on the same traffic."""
    countries = [c for c, _ in COUNTRIES]
    weights = np.array([w for _, w in COUNTRIES])
    n_seg = len(countries)
    spec = EngineSpec.from_plan(plan, 0, n_seg)
    n_g = len(spec.signals)
    hs = countries.index(HARM_COUNTRY)
    per_look = round(RATE * LOOK)
    looks_per_check = round(CHECK / LOOK)
    max_looks = math.ceil(spec.max_duration / LOOK)
    horizon = baseline_horizon(spec)
    z_naive = NormalDist().inv_cdf(0.95)
    tolerances = np.array(spec.tolerances)

    # true rates p[arm, segment, signal]
    p = np.full((2, n_seg, n_g), BASE_RATE)
    p[1, :, :] = scenario.candidate
    if scenario.segment_candidate is not None:
        p[1, hs, :] = scenario.segment_candidate
    pvals = np.concatenate([(1 - spec.share) * weights, spec.share * weights])

    n = np.zeros((runs, 2, n_seg))
    x = np.zeros((runs, 2, n_seg, n_g))
    ni = np.zeros((runs, 2))
    xi = np.zeros((runs, 2, n_g))
    out = {m: Outcome.empty(runs) for m in METHODS if m != "oracle"}  # the SPRT's comes last
    named = np.zeros(runs, bool)
    # SPRT request categories: candidate event / none, baseline event / none (of the stream
    # the scenario changes), everything else
    h0, h1 = scenario.oracle_h0, scenario.oracle_h1
    probes = [(*_bernoulli_llr(h0, h1), 0.0, 0.0, 0.0)]
    if scenario.harmful:
        # the SPRTs of the hypothesis safeshift tests, harm = tolerance: knowing the baseline
        # rate, and at the least favourable null point with the baseline unknown
        tol = spec.tolerances[scenario.oracle_signal]
        q = least_favourable_null(BASE_RATE, h1, tol, spec.share)
        probes.append((*_bernoulli_llr(h0 + tol, h1), 0.0, 0.0, 0.0))
        probes.append((*_bernoulli_llr(q + tol, h1), *_bernoulli_llr(q, BASE_RATE), 0.0))
    sprt = _Sprt(runs, probes)
    breakdown = _Breakdown(runs, spec) if scenario.name == "harmful" else None
    peek = Outcome.empty(runs)
    result = ScenarioResult(out, named, {"naive_no_tolerance": peek})

    for look in range(1, max_looks + 1):
        t = look * LOOK
        before = (look - 1) * per_look
        total = look * per_look
        draw = rng.multinomial(per_look, pvals, size=runs).reshape(runs, 2, n_seg)
        events = rng.binomial(draw[..., None], p).astype(np.float64)
        n += draw
        x += events
        ni += draw.sum(axis=2)
        xi += events.sum(axis=2)

        # oracle: the changed stream on the candidate arm, request by request
        cols = slice(hs, hs + 1) if scenario.oracle_segment is not None else slice(None)
        m_stream = draw[:, :, cols].sum(axis=2)
        k_stream = events[:, :, cols, scenario.oracle_signal].sum(axis=2).astype(np.int64)
        counts = np.stack([k_stream[:, 1], m_stream[:, 1] - k_stream[:, 1], k_stream[:, 0],
                           m_stream[:, 0] - k_stream[:, 0],
                           per_look - m_stream.sum(axis=1)], axis=1)
        sprt.look(rng, counts, t - LOOK, before)

        # safeshift: analyse() + the controller's rule
        ss = out["safeshift"]
        live = np.flatnonzero(ss.running)
        if live.size:
            n_live, x_live = n[live], x[live]
            v = engine_statuses(spec, n_live, x_live)
            for row in np.flatnonzero(live < verify):
                result.engine_checks += 1
                result.engine_mismatches += check_against_analyse(plan, spec, countries, n_live,
                                                                  x_live, v, int(row))
            harm = (v.overall == HARM).any(axis=1) | (v.segments == HARM).any(axis=(1, 2))
            pause = ~harm & v.srm_mismatch
            arms = n_live.sum(axis=2)
            promote = (~harm & ~pause & (v.overall == PASS).all(axis=1)
                       & (arms.min(axis=1) >= spec.min_samples) & (t >= spec.min_duration))
            stop = np.zeros(runs, bool)
            for code, cond in ((ROLLBACK, harm), (PAUSED, pause), (PROMOTE, promote)):
                stop[:] = False
                stop[live[cond]] = True
                ss.decide(stop, code, float(total), t)
            named[live[harm]] = (v.segments[harm, hs, :] == HARM).any(axis=1)
            if t >= spec.max_duration:
                ss.decide(np.ones(runs, bool), INCONCLUSIVE, float(total), t)

        # naive: fixed-sample z-test of harm beyond the tolerance, at every look
        nv = out["naive"]
        if nv.running.any() or peek.running.any():
            nb, nc = n[:, 0].sum(axis=1), n[:, 1].sum(axis=1)
            pb = x[:, 0].sum(axis=1) / nb[:, None]
            pc = x[:, 1].sum(axis=1) / nc[:, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                se = np.sqrt(pb * (1 - pb) / nb[:, None] + pc * (1 - pc) / nc[:, None])
                z = (pc - pb - tolerances) / se
                z0 = (pc - pb) / se
            nv.decide(((se > 0) & (z > z_naive)).any(axis=1), ROLLBACK, float(total), t)
            # the textbook peeking experiment: any significant difference in the bad direction
            peek.decide(((se > 0) & (z0 > z_naive)).any(axis=1), ROLLBACK, float(total), t)

        if look % looks_per_check == 0:
            with np.errstate(divide="ignore", invalid="ignore"):
                rb = xi[:, 0] / ni[:, 0, None]
                rc = xi[:, 1] / ni[:, 1, None]
                out["threshold"].decide((rc > rb + tolerances).any(axis=1), ROLLBACK,
                                        float(total), t)
                pmw = mann_whitney_p(xi[:, 1], ni[:, 1, None], xi[:, 0], ni[:, 0, None])
                high = ((pmw < 1 - KAYENTA_CONFIDENCE) & (rc > rb)
                        & ((rb == 0) | (rc / rb > 1 + KAYENTA_TOLERANCE)))
            out["mannwhitney"].decide(high.any(axis=1), ROLLBACK, float(total), t)
            ni[:] = 0
            xi[:] = 0
        if t >= horizon:
            for o in (out["naive"], out["threshold"], out["mannwhitney"], peek):
                o.decide(np.ones(runs, bool), PROMOTE, float(total), t)

        if breakdown is not None:
            breakdown.look(n, x, float(total), t)

        pending = any(o.running.any() for o in (*out.values(), peek))
        pending = pending or any(o.running.any() for o in sprt.outcomes)
        if not pending and (breakdown is None or breakdown.done):
            break

    every = np.ones(runs, bool)
    for o in (*out.values(), *sprt.outcomes, peek):
        o.decide(every, INCONCLUSIVE, np.nan, np.nan)
    out["oracle"] = sprt.outcomes[0]
    if len(sprt.outcomes) > 1:
        result.references["oracle_at_tolerance"] = sprt.outcomes[1]
        result.references["sprt_least_favourable"] = sprt.outcomes[2]
    if breakdown is not None:
        result.references.update(breakdown.outcomes)
    return result


class _Breakdown:
    """Where the engine's samples to roll back go, on the harmful scenario's traffic: the
    error-rate rule of ``compare()`` with its guarantees added one at a time."""

    STEPS = (
        ("mixture_known_baseline_no_tolerance", "always-valid, baseline known, no tolerance, "
                                                "alpha 0.05"),
        ("mixture_two_sample_no_tolerance", "+ baseline estimated from its arm"),
        ("mixture_two_sample_tolerance", "+ harm must exceed the 0.2 pt tolerance"),
        ("mixture_shared_alpha", "+ alpha shared over guardrails and segments (= safeshift's "
                                 "global error-rate verdict)"),
    )

    def __init__(self, runs: int, spec: EngineSpec) -> None:
        self.spec = spec
        self.outcomes = {name: Outcome.empty(runs) for name, _ in self.STEPS}

    @property
    def done(self) -> bool:
        return not any(o.running.any() for o in self.outcomes.values())

    def look(self, n: Array, x: Array, total: float, t: float) -> None:
        spec = self.spec
        nb, nc = n[:, 0].sum(axis=1), n[:, 1].sum(axis=1)
        xb, xc = x[:, 0, :, 0].sum(axis=1), x[:, 1, :, 0].sum(axis=1)
        tol = spec.tolerances[0]
        def rule(tol: float, alpha_harm: float, known: float | None = None) -> NDArray[np.int8]:
            return _compare(nb, xb, nc, xc, tol=tol, strict=False, n_star=spec.n_star,
                            alpha_harm=alpha_harm, alpha_pass=spec.alpha,
                            min_n=MIN_GLOBAL_SAMPLES, known_baseline=known)

        variants = {
            "mixture_known_baseline_no_tolerance": rule(0.0, spec.alpha, BASE_RATE),
            "mixture_two_sample_no_tolerance": rule(0.0, spec.alpha),
            "mixture_two_sample_tolerance": rule(tol, spec.alpha),
            "mixture_shared_alpha": rule(tol, spec.alpha_global),
        }
        for name, status in variants.items():
            self.outcomes[name].decide(status == HARM, ROLLBACK, total, t)


# -- figures ---------------------------------------------------------------------------------


def _quantile(values: Array, q: float) -> float | None:
    values = values[np.isfinite(values)]
    return float(np.quantile(values, q)) if values.size else None


def figures(o: Outcome) -> dict[str, Any]:
    """Rates and the median and 90th percentile of samples and seconds to a decision."""
    decided = (o.code == ROLLBACK) | (o.code == PROMOTE)
    rolled = o.code == ROLLBACK
    return {
        "rollback_rate": float(np.mean(o.code == ROLLBACK)),
        "promote_rate": float(np.mean(o.code == PROMOTE)),
        "inconclusive_rate": float(np.mean(~decided)),
        "paused_rate": float(np.mean(o.code == PAUSED)),  # sample-ratio mismatch
        "median_samples": _quantile(o.samples[decided], 0.5),
        "p90_samples": _quantile(o.samples[decided], 0.9),
        "median_seconds": _quantile(o.seconds[decided], 0.5),
        "p90_seconds": _quantile(o.seconds[decided], 0.9),
        "median_rollback_samples": _quantile(o.samples[rolled], 0.5),
        "mean_rollback_samples": float(np.mean(o.samples[rolled])) if rolled.any() else None,
    }


def must_show(methods: dict[str, dict[str, dict[str, Any]]], named: dict[str, float],
              bound: dict[str, Any] | None = None,
              clustered: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The properties the benchmark exists to show, each with its figure and verdict: on
    independent requests, then (``clustered``) on clustered traffic."""
    s, o = methods["safeshift"], methods["oracle"]
    ratio = math.nan
    if s["harmful"]["median_rollback_samples"] and o["harmful"]["median_rollback_samples"]:
        ratio = s["harmful"]["median_rollback_samples"] / o["harmful"]["median_rollback_samples"]
    checks = [
        ("A/A: false rollbacks ≤ 5%", s["aa"]["rollback_rate"], s["aa"]["rollback_rate"] <= 0.05),
        ("A/A: promoted within max_duration ≥ 80%", s["aa"]["promote_rate"],
         s["aa"]["promote_rate"] >= 0.80),
        ("harmful: rolled back ≥ 99%", s["harmful"]["rollback_rate"],
         s["harmful"]["rollback_rate"] >= 0.99),
        ("harmful: promoted ≤ 1%", s["harmful"]["promote_rate"],
         s["harmful"]["promote_rate"] <= 0.01),
        (f"harmful: median samples to roll back ≤ {ORACLE_RATIO_TARGET}× the oracle SPRT's",
         ratio, ratio <= ORACLE_RATIO_TARGET),
        ("within tolerance: rolled back ≤ 5%", s["within_tolerance"]["rollback_rate"],
         s["within_tolerance"]["rollback_rate"] <= 0.05),
        ("segment harm: rolled back ≥ 95%", s["segment_harm"]["rollback_rate"],
         s["segment_harm"]["rollback_rate"] >= 0.95),
        (f"segment harm: rolled back naming {SEGMENT_ATTRIBUTE}={HARM_COUNTRY} ≥ 95%",
         named["segment_harm"], named["segment_harm"] >= 0.95),
        ("exactly at the tolerance: rolled back ≤ 5%", s["at_tolerance"]["rollback_rate"],
         s["at_tolerance"]["rollback_rate"] <= 0.05),
        ("exactly at the tolerance: promoted ≤ 5%", s["at_tolerance"]["promote_rate"],
         s["at_tolerance"]["promote_rate"] <= 0.05),
        # unit clusters and traffic-weighted segment alpha must not cost the unclustered case
        ("A/A: false rollbacks ≤ 1% (no worse than before unit clusters)",
         s["aa"]["rollback_rate"], s["aa"]["rollback_rate"] <= 0.01),
        ("harmful: rolled back ≥ 99.9%", s["harmful"]["rollback_rate"],
         s["harmful"]["rollback_rate"] >= 0.999),
    ]
    if bound and bound.get("safeshift_vs_bound_median"):
        v = bound["safeshift_vs_bound_median"]
        checks.append((f"harmful: median samples to roll back ≤ {ORACLE_RATIO_TARGET}× the SPRT's "
                       f"at the least favourable null point", v, v <= ORACLE_RATIO_TARGET))
    if clustered is not None:
        from safeshift.bench import _clustered

        checks.extend(_clustered.must_show(clustered))
    return [{"check": c, "value": v, "ok": bool(ok)} for c, v, ok in checks]


def wald_asn_bound(p_b: float, p_c: float, tol: float, share: float, *,
                   alpha: float = SPRT_ALPHA, beta: float = SPRT_BETA) -> float:
    """Requests that *any* sequential test needs on average, under the truth (p_b, p_c), to
    reject "harm ≤ tol" with false-rollback rate ≤ ``alpha`` (at every baseline rate) and miss
    rate ≤ ``beta``: Wald's bound E[N]·KL ≥ (1-β)·ln((1-β)/α) + β·ln(β/(1-α)), with KL per
    request to the least favourable null point (Wald 1945; data processing)."""
    kl = _kl_to_null(p_b, p_c, tol, share, least_favourable_null(p_b, p_c, tol, share))
    return ((1 - beta) * math.log((1 - beta) / alpha) + beta * math.log(beta / (1 - alpha))) / kl


def harm_lower_bound(methods: dict[str, dict[str, dict[str, Any]]],
                     references: dict[str, dict[str, dict[str, Any]]],
                     share: float, tol: float) -> dict[str, Any] | None:
    """Samples to roll back the harmful candidate that no test with safeshift's guarantee can
    beat on average, against the oracle and against safeshift.

    A rule that keeps false rollbacks ≤ alpha for *every* candidate within the tolerance, the
    baseline rate unknown, keeps them ≤ alpha at the least favourable null point in
    particular. Wald's bound then limits its mean samples from below (``wald_asn_bound``,
    exact for any test), and Wald's SPRT between that point and the truth, which nearly
    attains it, shows the medians such a test reaches — even one told the true effect."""
    ref = references.get("sprt_least_favourable", {}).get("harmful")
    if not ref or not ref["median_rollback_samples"]:
        return None
    o, s = methods["oracle"]["harmful"], methods["safeshift"]["harmful"]
    harmful = next(sc for sc in SCENARIOS if sc.name == "harmful")
    asn = wald_asn_bound(BASE_RATE, harmful.oracle_h1, tol, share)

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    return {
        "wald_mean_bound": asn,
        "wald_bound_vs_oracle_mean": ratio(asn, o["mean_rollback_samples"]),
        "rule": "Wald's SPRT, H0 the least favourable null point (harm = tolerance, baseline "
                "unknown) vs H1 the true effect, alpha = beta = 0.05",
        "median_samples": ref["median_rollback_samples"],
        "mean_samples": ref["mean_rollback_samples"],
        "bound_vs_oracle_median": ratio(ref["median_rollback_samples"],
                                        o["median_rollback_samples"]),
        "bound_vs_oracle_mean": ratio(ref["mean_rollback_samples"], o["mean_rollback_samples"]),
        "safeshift_vs_bound_median": ratio(s["median_rollback_samples"],
                                           ref["median_rollback_samples"]),
        "safeshift_vs_bound_mean": ratio(s["mean_rollback_samples"], ref["mean_rollback_samples"]),
    }


def _fmt_n(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _fmt_s(value: float | None) -> str:
    if value is None:
        return "-"
    seconds = round(value)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def render(result: dict[str, Any], console: Console) -> None:
    plan = result["plan"]
    console.print(f"rollout decisions, {result['runs']:,} rollouts per scenario: "
                  f"{plan['rate']:g} req/s, {plan['traffic']} on the candidate, a look every "
                  f"{plan['look_seconds']:g} s, min {plan['min_duration']}, max "
                  f"{plan['max_duration']}, alpha {plan['alpha']:g}", markup=False)
    for sc in result["scenarios"]:
        table = Table(title=f"{sc}: {result['titles'][sc]}", box=box.SIMPLE_HEAD,
                      title_justify="left", pad_edge=False,
                      collapse_padding=True)
        table.add_column("method", no_wrap=True)
        for col in ("rollback", "promote", "neither", "n med", "n p90", "t med", "t p90"):
            table.add_column(col, justify="right", no_wrap=True)
        for method in METHODS:
            f = result["methods"][method][sc]
            table.add_row(method, f"{f['rollback_rate']:.1%}", f"{f['promote_rate']:.1%}",
                          f"{f['inconclusive_rate']:.1%}", _fmt_n(f["median_samples"]),
                          _fmt_n(f["p90_samples"]), _fmt_s(f["median_seconds"]),
                          _fmt_s(f["p90_seconds"]))
        console.print(table)
    console.print(f"baselines (naive, threshold, mannwhitney) promote at their horizon of "
                  f"{_fmt_s(plan['baseline_horizon_seconds'])}; the oracle is Wald's SPRT with "
                  f"alpha = beta = {SPRT_ALPHA}; samples are candidate + baseline requests.",
                  markup=False)
    console.print(f"segment harm named {SEGMENT_ATTRIBUTE}={HARM_COUNTRY} in "
                  f"{result['segment_named_rate']['segment_harm']:.1%} of rollouts", markup=False)
    check = result["engine_check"]
    console.print(f"vectorised engine checked against analysis.analyse() at {check['looks']:,} "
                  f"looks: {check['mismatches']} mismatching verdicts", markup=False)
    peek = result["reference"].get("naive_no_tolerance", {}).get("aa")
    if peek:
        console.print(f"naive z-test of any difference (no tolerance), peeking every look for "
                      f"{_fmt_s(plan['baseline_horizon_seconds'])}: A/A false rollbacks "
                      f"{peek['rollback_rate']:.1%}", markup=False)
    br = result.get("harm_cost_breakdown")
    if br:
        t = Table(title="harmful: median samples to roll back, guarantees added one at a time",
                  box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False,
                  collapse_padding=True)
        t.add_column("rule")
        t.add_column("median n", justify="right")
        t.add_column("× oracle", justify="right")
        for row in br:
            t.add_row(row["rule"], _fmt_n(row["median_samples"]),
                      "-" if row["vs_oracle"] is None else f"{row['vs_oracle']:.2f}")
        console.print(t)
    lb = result.get("harm_lower_bound")
    if lb:
        console.print(
            f"any test with safeshift's guarantee needs on average at least "
            f"{_fmt_n(lb['wald_mean_bound'])} requests to roll back the harmful candidate "
            f"(Wald's bound, {lb['wald_bound_vs_oracle_mean']:.2f}× the oracle's mean); the SPRT "
            f"at the least favourable null point, told the effect, takes median "
            f"{_fmt_n(lb['median_samples'])} ({lb['bound_vs_oracle_median']:.2f}× the oracle), "
            f"mean {_fmt_n(lb['mean_samples'])} ({lb['bound_vs_oracle_mean']:.2f}×); safeshift "
            f"takes {lb['safeshift_vs_bound_median']:.2f}× the SPRT (median), "
            f"{lb['safeshift_vs_bound_mean']:.2f}× (mean)", markup=False)
    if "clustered" in result:
        from safeshift.bench import _clustered

        _clustered.render(result["clustered"], console)
    for c in result["must_show"]:
        mark = "[green]✓[/green]" if c["ok"] else "[red]✗[/red]"
        v = c["value"]
        shown = "nan" if v is None or not math.isfinite(v) else (
            f"{v:.2f}×" if "×" in c["check"] else f"{v:.1%}")
        console.print(f"{mark} {c['check']}: {shown}")


def plot(result: dict[str, Any], path: Path) -> None:
    """Rollback and promotion rates and samples to a decision, per scenario and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = result["scenarios"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    width = 0.8 / len(METHODS)
    xs = np.arange(len(scenarios))
    for i, method in enumerate(METHODS):
        f = [result["methods"][method][sc] for sc in scenarios]
        offset = xs + (i - (len(METHODS) - 1) / 2) * width
        axes[0].bar(offset, [v["rollback_rate"] for v in f], width, label=method)
        axes[1].bar(offset, [v["promote_rate"] for v in f], width, label=method)
        med = np.array([v["median_samples"] or np.nan for v in f], dtype=float)
        p90 = np.array([v["p90_samples"] or np.nan for v in f], dtype=float)
        axes[2].bar(offset, med, width, label=method)
        axes[2].errorbar(offset, med, yerr=[np.zeros_like(med), np.nan_to_num(p90 - med)],
                         fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
    for ax, title in zip(axes, ("rollback rate", "promotion rate",
                                "samples to a decision (median, bar to p90)"), strict=True):
        ax.set_xticks(xs, [sc.replace("_", "\n") for sc in scenarios])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].axhline(0.05, color="grey", lw=0.8, ls="--")
    axes[2].set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(METHODS), frameon=False)
    fig.suptitle(f"safeshift bench decisions — {result['runs']:,} rollouts per cell, "
                 f"seed {result['seed']}")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(*, quick: bool, runs: int | None, json_path: Path | None, plot_path: Path | None,
         seed: int, console: Console) -> dict[str, Any]:
    """Run every scenario with every method, print the table, optionally write JSON and PNG."""
    runs = runs if runs is not None else (200 if quick else 2000)
    if runs < 1:
        raise ValueError("runs must be at least 1")
    verify = 2 if quick else 10
    plan = bench_plan()
    started = time.perf_counter()
    results: dict[str, ScenarioResult] = {}

    def say(line: str) -> None:
        console.print(f"  ... {line}", markup=False, highlight=False)

    for index, scenario in enumerate(SCENARIOS):
        say(f"scenario {index + 1}/{len(SCENARIOS)} {scenario.name}: {runs:,} rollouts "
            f"({time.perf_counter() - started:.0f} s so far)")
        rng = np.random.default_rng([seed, index])
        results[scenario.name] = simulate(plan, scenario, runs, rng, verify=verify)
    elapsed = time.perf_counter() - started

    spec = EngineSpec.from_plan(plan, 0, len(COUNTRIES))
    methods = {m: {name: figures(r.outcomes[m]) for name, r in results.items()} for m in METHODS}
    named = {name: float(np.mean(r.segment_named & (r.outcomes["safeshift"].code == ROLLBACK)))
             for name, r in results.items()}
    references: dict[str, dict[str, dict[str, Any]]] = {}
    for name, r in results.items():
        for ref, o in r.references.items():
            references.setdefault(ref, {})[name] = figures(o)
    oracle_rb = methods["oracle"]["harmful"]["median_rollback_samples"]
    breakdown: list[dict[str, Any]] = [
        {"rule": "oracle: SPRT, H0 no change vs H1 the true effect (baseline known)",
         "median_samples": oracle_rb, "vs_oracle": 1.0 if oracle_rb else None},
    ]
    if "oracle_at_tolerance" in references:
        med = references["oracle_at_tolerance"]["harmful"]["median_rollback_samples"]
        breakdown.append({"rule": "SPRT, H0 harm = tolerance vs H1 the true effect "
                                  "(baseline and effect known)",
                          "median_samples": med,
                          "vs_oracle": med / oracle_rb if med and oracle_rb else None})
    for key, rule in _Breakdown.STEPS:
        if key in references:
            med = references[key]["harmful"]["median_rollback_samples"]
            breakdown.append({"rule": rule, "median_samples": med,
                              "vs_oracle": med / oracle_rb if med and oracle_rb else None})
    safeshift_rb = methods["safeshift"]["harmful"]["median_rollback_samples"]
    breakdown.append({"rule": "safeshift (every guardrail and segment, controller rule)",
                      "median_samples": safeshift_rb,
                      "vs_oracle": safeshift_rb / oracle_rb if safeshift_rb and oracle_rb
                      else None})
    out: dict[str, Any] = {
        "runs": runs,
        "harm_lower_bound": harm_lower_bound(methods, references, spec.share,
                                             spec.tolerances[0]),
        "seed": seed,
        "quick": quick,
        "seconds": round(elapsed, 1),
        "plan": {"rate": RATE, "traffic": TRAFFIC, "look_seconds": LOOK,
                 "check_seconds": CHECK, "min_duration": MIN_DURATION,
                 "max_duration": MAX_DURATION, "min_samples": MIN_SAMPLES,
                 "n_star": spec.n_star, "alpha": spec.alpha, "alpha_global": spec.alpha_global,
                 "alpha_segment": {c: float(a) for (c, _), a in zip(
                     COUNTRIES, segment_alpha(spec, np.array([w for _, w in COUNTRIES])),
                     strict=True)},
                 "guardrails": dict(zip(spec.signals, spec.tolerances, strict=True)),
                 "segments": dict(COUNTRIES),
                 "baseline_horizon_seconds": baseline_horizon(spec)},
        "scenarios": [s.name for s in SCENARIOS],
        "titles": {s.name: s.title for s in SCENARIOS},
        "methods": methods,
        "segment_named_rate": named,
        "reference": references,
        "harm_cost_breakdown": breakdown,
        "engine_check": {"looks": sum(r.engine_checks for r in results.values()),
                         "mismatches": sum(r.engine_mismatches for r in results.values())},
    }
    from safeshift.bench import _clustered

    out["clustered"] = _clustered.run(runs=max(runs // 2, 1), seed=seed, quick=quick, say=say)
    out["must_show"] = must_show(methods, named, out["harm_lower_bound"], out["clustered"])
    render(out, console)
    c = out["clustered"]
    per = c["runs_per_scenario"]
    console.print(f"{len(SCENARIOS)} scenarios × {runs:,} rollouts in {elapsed:.1f} s; "
                  f"{len(c['scenarios'])} clustered scenarios × {per['clustered_aa']:,} rollouts "
                  f"({per['many_segments_aa']:,} with 50 countries) in {c['seconds']:.1f} s",
                  markup=False)
    if json_path is not None:
        json_path.write_text(json.dumps(_finite(out), indent=2, ensure_ascii=False))
    if plot_path is not None:
        plot(out, plot_path)
    return out


def _finite(value: Any) -> Any:
    """JSON has no NaN: write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
