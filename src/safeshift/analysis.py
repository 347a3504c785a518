"""Guardrails × segments → verdicts with evidence.

For every guardrail that applies to the stage, globally and for each value of each segment
attribute, the candidate is compared with the baseline on the same traffic period by an
always-valid one-sided confidence sequence on the *harm* (the difference in the metric's bad
direction):

- **harm**: the lower bound of harm exceeds the tolerance (any harm > 0 with ``strict``) →
  roll back, naming the guardrail and segment. The false-rollback alpha is shared: half for
  the global tests split over guardrails, half for the segment tests split over guardrails ×
  segment values (Bonferroni).
- **pass**: the upper bound of harm (at the plan's alpha, per guardrail: an intersection-union
  test needs no correction) is below the tolerance. Only global verdicts gate promotion.
- **hold**: neither yet; **no data**: too few observations to judge (never a failure).

Absolute bounds (``max``/``min``) are judged on the candidate alone. Rates use the
Agresti–Caffo standard error (one success and one failure added per arm) so that an arm with
no events yet does not look certain.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

from safeshift._units import BASIS_POINTS
from safeshift.assign import BASELINE, CANDIDATE
from safeshift.plan import Direction, Guardrail, Plan, Source, Stage
from safeshift.stats import (
    PSI_THRESHOLD,
    Estimate,
    SRMResult,
    chi_square_classes,
    cluster_ratio,
    confidence_sequence,
    confidence_sequence_one_sample,
    count_dispersion,
    diff_means,
    diff_proportions,
    diff_ratios,
    jensen_shannon,
    one_sample_mean,
    one_sample_proportion,
    psi,
    srm_test,
    wasserstein_from_histograms,
)
from safeshift.telemetry import SCORE_BINS, Moments, Pooled, Summary

MIN_GLOBAL_SAMPLES = 30
"""Observations per arm below which a global comparison is not judged (asymptotics)."""

DRIFT_MIN_SAMPLES = 1000
"""Predictions per arm before prediction drift is judged: PSI's sampling noise over ten bins
is about 9·(1/n_b + 1/n_c), under 0.02 here, well below the usual 0.1 threshold."""

REQUESTS = "requests"
UNITS = "units"


class Status(StrEnum):
    HARM = "harm"
    PASS = "pass"
    HOLD = "hold"
    NO_DATA = "no_data"


@dataclass(slots=True)
class Verdict:
    """One guardrail on one population (global, or one segment value), with its evidence."""

    guardrail: str
    segment: str | None
    status: Status
    estimate: float  # candidate - baseline (absolute), or candidate/baseline - 1 (relative)
    lower: float  # interval on the estimate: lower end
    upper: float
    tolerance: float
    relative: bool
    rate: bool
    n_baseline: float
    n_candidate: float
    mean_baseline: float
    mean_candidate: float
    bound: str | None  # "max"/"min" for absolute bounds
    alpha_harm: float
    alpha_pass: float
    test: str
    sentence: str
    harm: float = math.nan  # the estimate oriented so that larger is worse
    arm: str = CANDIDATE  # the candidate variant judged (a challenger's name in an experiment)
    se: float = math.nan  # the standard error the bounds used (unit-level when clustered)
    harm_upper: float = math.nan  # the largest harm not yet excluded (at the pass alpha)
    protected: bool = False  # a protected segment value: it must pass before promotion

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = str(self.status)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in data.items()}


@dataclass(slots=True)
class StageAnalysis:
    """Everything the controller needs to decide about one stage."""

    stage: str
    stage_index: int
    n_baseline: float
    n_candidate: float
    verdicts: list[Verdict] = field(default_factory=list)
    srm: SRMResult | None = None
    srm_counted: str = UNITS  # what the sample-ratio check counted: units, or requests
    drift: dict[str, Any] | None = None

    @property
    def harms(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.status is Status.HARM]

    @property
    def global_verdicts(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.segment is None]

    @property
    def gating(self) -> list[Verdict]:
        """The verdicts promotion waits on: every global one and every protected segment's."""
        return [v for v in self.verdicts if v.segment is None or v.protected]

    def passes(self, arm: str | None = None) -> bool:
        """Every gating verdict (of ``arm``, or of every arm) passes."""
        return all(v.status is Status.PASS for v in self.gating if arm is None or v.arm == arm)

    @property
    def all_pass(self) -> bool:
        return self.passes()

    @property
    def waiting_on(self) -> list[Verdict]:
        return [v for v in self.gating if v.status is not Status.PASS]

    def to_json(self) -> dict[str, Any]:
        srm = None
        if self.srm is not None:
            srm = {"counts": list(self.srm.counts), "expected": list(self.srm.expected),
                   "observed": list(self.srm.observed), "p_value": self.srm.p_value,
                   "mismatch": self.srm.mismatch, "counted": self.srm_counted,
                   "dispersion": self.srm.dispersion}
        return {"stage": self.stage, "stage_index": self.stage_index,
                "n_baseline": self.n_baseline, "n_candidate": self.n_candidate,
                "verdicts": [v.to_json() for v in self.verdicts], "srm": srm,
                "drift": self.drift}


def tuning_samples(plan: Plan, stage: Stage) -> float:
    """N* for the stage, fixed before data arrives, in effective units (see ``effective_n``)."""
    cand = float(stage.expected_samples or max(stage.min_samples, plan.analysis.expected_samples))
    share = (stage.served or stage.shadow) / BASIS_POINTS
    if stage.is_shadow:
        base = cand / max(share, 1e-4)
    else:
        share = min(max(share, 1e-4), 1 - 1e-4)
        base = cand * (1 - share) / share
    return effective_n(base, cand)


def effective_n(n_b: float, n_c: float) -> float:
    """Information-equivalent total sample size: ``n_b + n_c`` for an even split, about
    ``4·n_c`` when the candidate arm is small. It is the time scale of the mixture boundary."""
    if n_b <= 0 or n_c <= 0:
        return 0.0
    return 4.0 * n_b * n_c / (n_b + n_c)


def _fmt(value: float, rate: bool, relative: bool, *, signed: bool = True,
         level: bool = False) -> str:
    """Differences of rates in percentage points, levels of rates in percent."""
    if not math.isfinite(value):
        return "-inf" if value < 0 else "+inf"
    sign = "+" if signed else ""
    if relative or (rate and level):
        return f"{value * 100:{sign}.{1 if relative else 2}f}%"
    if rate:
        return f"{value * 100:{sign}.2f} pt"
    return f"{value:{sign}.3g}"


def format_measure(value: float, rate: bool, relative: bool, *, signed: bool = True,
                   level: bool = False) -> str:
    """A verdict's number as its sentences write it: differences of rates in percentage points,
    levels of rates in percent, relative differences in percent."""
    return _fmt(value, rate, relative, signed=signed, level=level)


def _status(g: Guardrail, harm_lo: float, harm_hi: float, tol: float) -> Status:
    if harm_lo > (0.0 if g.strict else tol):
        return Status.HARM
    return Status.PASS if harm_hi < tol else Status.HOLD


def _sentence(g: Guardrail, status: Status, diff: float, lo: float, hi: float, tol: float, *,
              relative: bool, where: str, sign: float) -> str:
    """One plain sentence: the difference, its interval, where, and what that means."""
    rate = g.info.rate
    text = (f"{g.describe()} {_fmt(diff, rate, relative)} "
            f"[{_fmt(lo, rate, relative)}, {_fmt(hi, rate, relative)}]{where}")
    tol_text = _fmt(tol, rate, relative, signed=False)  # a margin on a difference: pt
    if status is Status.HARM:
        limit = "any harm (strict)" if g.strict else f"the {tol_text} tolerance"
        verb = "exceeds" if sign > 0 else "falls short by more than"
        return f"{text} {verb} {limit}"
    if status is Status.PASS:
        return f"{text} is proven within the {tol_text} tolerance"
    return f"{text}: not yet conclusive against the {tol_text} tolerance"


def _clustered_se(iid_se: float, pooled: Sequence[Pooled]) -> tuple[float, float, int]:
    """The standard error to use and the information factor for the boundary's time.

    With clustered telemetry (a plan with a ``unit``), the unit-level variance is the sum of
    each pooled arm's cluster-robust variance; the standard error is never taken below the
    request-level one (``iid_se``, which carries the Agresti-Caffo or Welch floor), so that a
    noisy variance estimate from few clusters cannot make an interval narrower than treating
    requests as independent would. The factor ``(iid_se / se)²`` (one over the design effect)
    turns request counts into effective samples: the boundary's time is then proportional to
    the information, as the normal-mixture boundary assumes. Returns ``(se, factor, clusters)``;
    ``(iid_se, 1, 0)`` when the telemetry is not clustered."""
    if not pooled or not all(p.clustered for p in pooled):
        return iid_se, 1.0, 0
    var, groups = 0.0, 0
    for p in pooled:
        _, v, g = cluster_ratio([c[0] for c in p.clusters.values()],
                                [c[1] for c in p.clusters.values()])
        var += v
        groups = min(groups, g) if groups else g
    se = max(math.sqrt(var), iid_se)
    factor = (iid_se / se) ** 2 if 0.0 < se < math.inf and math.isfinite(iid_se) else 1.0
    return se, factor, groups


def _relative_clustered_se(iid_se: float, b: Pooled, c: Pooled) -> tuple[float, float, int]:
    """As :func:`_clustered_se` for a relative difference c/b - 1 (delta method)."""
    if not (b.clustered and c.clustered):
        return iid_se, 1.0, 0
    est = diff_ratios([v[0] for v in b.clusters.values()], [v[1] for v in b.clusters.values()],
                      [v[0] for v in c.clusters.values()], [v[1] for v in c.clusters.values()],
                      relative=True)
    se = max(est.se, iid_se) if math.isfinite(est.se) else math.inf
    factor = (iid_se / se) ** 2 if 0.0 < se < math.inf and math.isfinite(iid_se) else 1.0
    return se, factor, min(len(b.clusters), len(c.clusters))


def _pooled(m: Moments | Pooled) -> Pooled:
    """Totals without clusters are judged request by request."""
    return m if isinstance(m, Pooled) else Pooled(m.n, m.s, m.ss)


def _unit_level(test: str, clusters: int) -> str:
    if not clusters:
        return test
    return f"{test}, unit-level standard error over {clusters} unit clusters"


def _harm_bounds(harm: Estimate, n: float, *, n_star: float, alpha_harm: float,
                 alpha_pass: float) -> tuple[float, float]:
    """The harm's one-sided lower bound (at the harm alpha) and upper bound (at the pass alpha)
    at time ``n``: always-valid confidence sequences."""
    lo = confidence_sequence(harm, alpha=alpha_harm, n_star=n_star, side="lower", n=n).lower
    hi = confidence_sequence(harm, alpha=alpha_pass, n_star=n_star, side="upper", n=n).upper
    return lo, hi


def compare(g: Guardrail, b: Moments | Pooled, c: Moments | Pooled, *, n_star: float,
            alpha_harm: float, alpha_pass: float, min_n: float, segment: str | None) -> Verdict:
    b, c = _pooled(b), _pooled(c)
    info = g.info
    relative = g.relative_tolerance is not None
    tol = (g.relative_tolerance / BASIS_POINTS if relative and g.relative_tolerance is not None
           else float(g.tolerance or 0.0))
    sign = 1.0 if info.bad is Direction.INCREASE else -1.0
    where = f" for {segment}" if segment else ""
    label = g.describe()
    test = "one-sided normal-mixture confidence sequence on the difference"
    if b.n < min_n or c.n < min_n:
        raw = c.s / c.n - b.s / b.n if b.n and c.n else math.nan
        return Verdict(g.key, segment, Status.NO_DATA, raw, -math.inf, math.inf, tol,
                       relative, info.rate, b.n, c.n, b.moments.mean, c.moments.mean, None,
                       alpha_harm, alpha_pass, test,
                       f"{label}{where}: {int(c.n)} candidate and {int(b.n)} baseline "
                       f"observations, fewer than {int(min_n)} per arm; not judged yet",
                       sign * raw)
    if info.rate:
        est = diff_proportions(b.s, b.n, c.s, c.n, relative=relative)
        adjusted = diff_proportions(b.s + 1, b.n + 2, c.s + 1, c.n + 2, relative=relative)
        est = replace(est, se=adjusted.se) if math.isfinite(est.diff) else adjusted
        test += " of proportions (Agresti-Caffo standard error)"
    else:
        est = diff_means(b.n, b.s, b.ss, c.n, c.s, c.ss, relative=relative)
        test += " of means"
    se, factor, clusters = (_relative_clustered_se(est.se, b, c) if relative
                            else _clustered_se(est.se, (b, c)))
    harm = replace(est, diff=sign * est.diff, se=se)
    harm_lo, harm_hi = _harm_bounds(harm, effective_n(b.n, c.n) * factor, n_star=n_star,
                                    alpha_harm=alpha_harm, alpha_pass=alpha_pass)
    # interval on the natural difference (candidate - baseline); a difference of two rates
    # lies in [-1, 1], so the reported interval is cut there (decisions are unaffected)
    lo, hi = (harm_lo, harm_hi) if sign > 0 else (-harm_hi, -harm_lo)
    if info.rate and not relative:
        lo, hi = max(lo, -1.0), min(hi, 1.0)
    status = _status(g, harm_lo, harm_hi, tol)
    sentence = _sentence(g, status, est.diff, lo, hi, tol, relative=relative,
                         where=where, sign=sign)
    return Verdict(g.key, segment, status, est.diff, lo, hi, tol, relative, info.rate, b.n, c.n,
                   est.mean_baseline, est.mean_candidate, None, alpha_harm, alpha_pass,
                   _unit_level(test, clusters), sentence, harm.diff, se=se, harm_upper=harm_hi)


def compare_paired(g: Guardrail, d: Moments | Pooled, *, n_star: float, alpha_harm: float,
                   alpha_pass: float, segment: str | None, pseudo: bool = True,
                   on: str = "the same inputs") -> Verdict:
    """Candidate against baseline on the *same* inputs (shadow, both answers labelled): a
    one-sample confidence sequence on the mean paired difference. With ``pseudo``, one
    discordant pair each way is added to the variance so that perfect agreement on few labels
    is not certainty (for 0/1 labels; Prometheus values, paired by time, are judged as they
    are). Pairs of one unit are correlated like its requests, so clustered telemetry gives the
    unit-level standard error."""
    d = _pooled(d)
    info = g.info
    tol = float(g.tolerance or 0.0)
    sign = 1.0 if info.bad is Direction.INCREASE else -1.0
    mean = d.s / d.n
    _, iid_se = (one_sample_mean(d.n + 2, d.s, d.ss + 2) if pseudo
                 else one_sample_mean(d.n, d.s, d.ss))
    se, factor, clusters = _clustered_se(iid_se, (d,))
    n_eff = 2.0 * d.n * factor  # n pairs carry the information of 2n observations split evenly
    harm = Estimate(sign * mean, se, int(d.n), int(d.n), math.nan, math.nan, False)
    harm_lo, harm_hi = _harm_bounds(harm, n_eff, n_star=n_star, alpha_harm=alpha_harm,
                                    alpha_pass=alpha_pass)
    lo, hi = (harm_lo, harm_hi) if sign > 0 else (-harm_hi, -harm_lo)
    status = _status(g, harm_lo, harm_hi, tol)
    where = f" for {segment}" if segment else ""
    sentence = _sentence(g, status, mean, lo, hi, tol, relative=False,
                         where=f"{where} on {on}", sign=sign)
    return Verdict(g.key, segment, status, mean, lo, hi, tol, False, info.rate, d.n, d.n,
                   math.nan, math.nan, None, alpha_harm, alpha_pass,
                   _unit_level("one-sided normal-mixture confidence sequence on paired "
                               "differences", clusters), sentence, harm.diff, se=se,
                   harm_upper=harm_hi)


def bound(g: Guardrail, c: Moments | Pooled, *, n_star: float, alpha_harm: float,
          alpha_pass: float, min_n: float, segment: str | None) -> Verdict:
    c = _pooled(c)
    info = g.info
    # a tolerance on a pairwise shadow metric is an upper bound when higher is worse
    upper_bound = g.max is not None or (g.min is None and info.bad is Direction.INCREASE)
    limit = float(g.max if g.max is not None else g.min if g.min is not None else g.tolerance or 0)
    where = f" for {segment}" if segment else ""
    label = g.describe()
    kind = "max" if upper_bound else "min"
    test = "one-sided normal-mixture confidence sequence on the candidate alone"
    if c.n < min_n:
        return Verdict(g.key, segment, Status.NO_DATA, math.nan, -math.inf, math.inf, limit,
                       False, info.rate, 0.0, c.n, math.nan, c.moments.mean, kind, alpha_harm,
                       alpha_pass, test, f"{label}{where}: {int(c.n)} candidate observations, "
                       f"fewer than {int(min_n)}; not judged yet")
    if info.rate:
        mean, iid_se = one_sample_proportion(c.s + 1, c.n + 2)
    else:
        mean, iid_se = one_sample_mean(c.n, c.s, c.ss)
    se, factor, clusters = _clustered_se(iid_se, (c,))
    # one-arm analogue of effective_n: an even split of 2·n_c carries the same information
    n_eff = 4.0 * c.n * factor
    alpha_hi, alpha_lo = (alpha_pass, alpha_harm) if upper_bound else (alpha_harm, alpha_pass)
    lo = confidence_sequence_one_sample(mean, se, n_eff, alpha=alpha_lo, n_star=n_star,
                                        side="lower").lower
    hi = confidence_sequence_one_sample(mean, se, n_eff, alpha=alpha_hi, n_star=n_star,
                                        side="upper").upper
    if upper_bound:
        harm, safe = lo > limit, hi < limit
    else:
        harm, safe = hi < limit, lo > limit
    status = Status.HARM if harm else Status.PASS if safe else Status.HOLD
    if info.rate:
        lo, hi = max(lo, 0.0), min(hi, 1.0)
    text = (f"{label} {_fmt(c.s / c.n, info.rate, False, signed=False, level=True)} "
            f"[{_fmt(lo, info.rate, False, signed=False, level=True)}, "
            f"{_fmt(hi, info.rate, False, signed=False, level=True)}]")
    lim = _fmt(limit, info.rate, False, signed=False, level=True)
    sentence = {
        Status.HARM: f"{text}{where} breaks the {kind} of {lim}",
        Status.PASS: f"{text}{where} is proven within the {kind} of {lim}",
        Status.HOLD: f"{text}{where}: not yet conclusive against the {kind} of {lim}",
    }[status]
    excess = c.s / c.n - limit if upper_bound else limit - c.s / c.n
    return Verdict(g.key, segment, status, c.s / c.n, lo, hi, limit, False, info.rate, 0.0, c.n,
                   math.nan, c.s / c.n, kind, alpha_harm, alpha_pass,
                   _unit_level(test, clusters), sentence, excess, se=se,
                   harm_upper=(hi - limit) if upper_bound else (limit - lo))


def prediction_drift(summary: Summary, arm: str = CANDIDATE) -> dict[str, Any] | None:
    """How the candidate's predictions are distributed against the baseline's: PSI,
    Jensen-Shannon and Wasserstein over score bins, or PSI, Jensen-Shannon and a chi-square
    test over classes. Descriptive: ``prediction_drift`` guardrails compare PSI with a max."""
    keys = [str(i) for i in range(SCORE_BINS)]
    b = summary.counts(BASELINE, "score_bin:")
    c = summary.counts(arm, "score_bin:")
    if b and c:
        pb = [b.get(k, 0.0) for k in keys]
        pc = [c.get(k, 0.0) for k in keys]
        edges = [i / SCORE_BINS for i in range(SCORE_BINS + 1)]
        return {"kind": "scores", "n_baseline": sum(pb), "n_candidate": sum(pc),
                "psi": psi(pb, pc), "jensen_shannon": jensen_shannon(pb, pc),
                "wasserstein": wasserstein_from_histograms(edges, pb, pc),
                "baseline": pb, "candidate": pc}
    b = summary.counts(BASELINE, "class:")
    c = summary.counts(arm, "class:")
    if b and c:
        classes = sorted(set(b) | set(c))
        pb = [b.get(k, 0.0) for k in classes]
        pc = [c.get(k, 0.0) for k in classes]
        result: dict[str, Any] = {"kind": "classes", "n_baseline": sum(pb),
                                  "n_candidate": sum(pc), "psi": psi(pb, pc),
                                  "jensen_shannon": jensen_shannon(pb, pc),
                                  "classes": classes, "baseline": pb, "candidate": pc}
        if len(classes) > 1:
            result["chi_square"], result["chi_square_p"] = chi_square_classes(b, c)
        return result
    return None


def drift_verdict(g: Guardrail, drift: dict[str, Any] | None, min_n: float) -> Verdict:
    limit = float(g.max if g.max is not None else PSI_THRESHOLD)
    test = "population stability index of the prediction distributions (descriptive)"
    nb = float(drift["n_baseline"]) if drift else 0.0
    nc = float(drift["n_candidate"]) if drift else 0.0
    if drift is None or min(nb, nc) < min_n:
        return Verdict(g.key, None, Status.NO_DATA, math.nan, -math.inf, math.inf, limit, False,
                       False, nb, nc, math.nan, math.nan, "max", 0.0, 0.0, test,
                       f"prediction drift: {int(nc)} candidate and {int(nb)} baseline predictions, "
                       f"fewer than {int(min_n)} per arm; not judged yet")
    value = float(drift["psi"])
    status = Status.HARM if value > limit else Status.PASS
    word = "exceeds" if status is Status.HARM else "is within"
    return Verdict(g.key, None, status, value, value, value, limit, False, False, nb, nc,
                   math.nan, math.nan, "max", 0.0, 0.0, test,
                   f"prediction drift PSI {value:.3f} ({drift['kind']}) {word} the max of "
                   f"{limit:g}", value - limit)


def _judge(g: Guardrail, summary: Summary, *, stage: Stage, arm: str,
           where: tuple[str, str] | None, n_star: float, alpha_harm: float, alpha_pass: float, min_n: float,
           several: bool) -> Verdict:
    signal = g.key
    segment = f"{where[0]}={where[1]}" if where else None
    if g.prometheus is not None:  # interval values: their own minimum and time scale
        min_n = float(g.prometheus.min_samples)
        n_star = 2.0 * g.prometheus.expected_samples(stage)
    c = summary.pooled(arm, signal, where=where)
    if g.is_bound or g.info.source is Source.SHADOW:
        v = bound(g, c, n_star=n_star, alpha_harm=alpha_harm, alpha_pass=alpha_pass,
                  min_n=min_n, segment=segment)
    else:
        b = summary.pooled(BASELINE, signal, where=where)
        v = compare(g, b, c, n_star=n_star, alpha_harm=alpha_harm, alpha_pass=alpha_pass,
                    min_n=min_n, segment=segment)
    if g.info.source is Source.FEEDBACK:
        paired = summary.pooled(arm, f"{signal}:paired", where=where)
        if paired.n >= min_n:
            v = compare_paired(g, paired, n_star=n_star, alpha_harm=alpha_harm,
                               alpha_pass=alpha_pass, segment=segment)
    elif g.info.source is Source.PROMETHEUS and not g.is_bound \
            and g.relative_tolerance is None:
        # one value per arm read at the same instant: the difference removes what both arms
        # share in that interval (load, time of day), so the pairs are judged
        paired = summary.pooled(arm, f"{signal}:paired", where=where)
        if paired.n >= min_n:
            v = compare_paired(g, paired, n_star=n_star, alpha_harm=alpha_harm,
                               alpha_pass=alpha_pass, segment=segment, pseudo=False,
                               on="values read at the same instants")
    v.arm = arm
    if several:
        v.sentence = f"[{arm}] {v.sentence}"
    return v


def segment_weights(requests: Mapping[tuple[str, str], float]) -> dict[tuple[str, str], float]:
    """How the segment tests' share of alpha is spent, from each value's baseline requests in
    the stage: each attribute gets an equal part, and within it a value gets half by its share
    of the traffic and half evenly. Large values, where harm reaches the most users, get more;
    none gets less than half an even split. The weights sum to 1.

    Baseline requests carry no information about the candidate's metrics (the candidate
    cannot change them), so weighting by them keeps each test's level; they move only while a
    stage's traffic mix settles."""
    by_attr: dict[str, dict[str, float]] = {}
    for (attr, value), n in requests.items():
        by_attr.setdefault(attr, {})[value] = max(float(n), 0.0)
    out: dict[tuple[str, str], float] = {}
    for attr, counts in by_attr.items():
        total = sum(counts.values())
        for value, n in counts.items():
            share = n / total if total > 0 else 1.0 / len(counts)
            out[(attr, value)] = (0.5 * share + 0.5 / len(counts)) / len(by_attr)
    return out


def analyse(plan: Plan, stage_index: int, summary: Summary,
            variants: Sequence[str] = (CANDIDATE,)) -> StageAnalysis:
    """Judge every guardrail that applies to the stage, globally and per segment value, for
    each candidate variant (several only in an experiment stage) against the baseline."""
    stage = plan.stages[stage_index]
    guardrails = plan.guardrails_for(stage)
    alpha = plan.analysis.alpha
    n_star = tuning_samples(plan, stage)
    n_b = summary.total(BASELINE, REQUESTS).n
    n_c = sum(summary.total(v, REQUESTS).n for v in variants)
    out = StageAnalysis(stage.name, stage_index, n_b, n_c)
    several = len(variants) > 1

    seg_values = summary.segment_values()
    # prediction drift is one number per arm; Prometheus series carry no safeshift segments
    segmented = [g for g in guardrails if g.segments and g.metric != "prediction_drift"
                 and g.prometheus is None]
    protected = {(attr, str(v)) for attr, vs in plan.analysis.protected.items() for v in vs}
    # a protected value is judged before it has data: its "no data" holds the promotion
    values = sorted({(attr, value) for attr in plan.segments for value in seg_values.get(attr, ())}
                    | protected)
    judged = [(g, where) for g in segmented for where in values]
    # false rollbacks are shared over every harm test: guardrails x variants globally, and
    # guardrails x segment values x variants for the segments, weighted by traffic
    k = max(len(guardrails), 1) * len(variants)
    has_segments = bool(judged)
    alpha_global = (alpha / 2 if has_segments else alpha) / k
    weights = segment_weights({where: summary.total(BASELINE, REQUESTS, where=where).n
                               for where in values})
    alpha_segment = {where: (alpha / 2) * w / (len(segmented) * len(variants))
                     for where, w in weights.items()}
    out.drift = prediction_drift(summary, variants[0])
    for arm in variants:
        for g in guardrails:
            if g.metric == "prediction_drift":
                verdict = drift_verdict(g, prediction_drift(summary, arm), DRIFT_MIN_SAMPLES)
                verdict.arm = arm
                out.verdicts.append(verdict)
                continue
            out.verdicts.append(_judge(g, summary, stage=stage, arm=arm, where=None,
                                       n_star=n_star,
                                       alpha_harm=alpha_global, alpha_pass=alpha,
                                       min_n=MIN_GLOBAL_SAMPLES, several=several))
        for g, where in judged:
            verdict = _judge(g, summary, stage=stage, arm=arm, where=where, n_star=n_star,
                             alpha_harm=alpha_segment[where], alpha_pass=alpha,
                             min_n=plan.analysis.segment_min_samples, several=several)
            verdict.protected = where in protected
            out.verdicts.append(verdict)
    if plan.probes:  # golden inputs: their own verdicts, no test (safeshift.probes)
        from safeshift.probes import probe_verdicts

        out.verdicts += probe_verdicts(plan, summary, variants)
    if not stage.is_shadow and 0 < stage.served < BASIS_POINTS:
        # the split is by unit, so units are counted (first sightings per process); telemetry
        # written without them falls back to requests, whose share wanders more because a
        # user's requests travel together. Either way only a deviation beyond the floor pauses.
        units_b = summary.total(BASELINE, UNITS).n
        out.srm_counted = counted = UNITS if units_b > 0 else REQUESTS
        # every candidate variant that served in the stage, dropped experiment arms included
        candidates = [arm for arm in summary.arms() if arm != BASELINE]
        n_all = sum(summary.total(arm, counted).n for arm in candidates)
        share = stage.served / BASIS_POINTS
        floor = max(0.002, plan.analysis.srm_min_deviation * min(share, 1 - share))
        out.srm = srm_test([int(units_b if units_b > 0 else n_b), int(n_all)],
                           [1 - share, share], alpha=plan.analysis.srm_alpha,
                           min_deviation=floor,
                           dispersion=_unit_dispersion(summary, candidates)
                           if counted == UNITS else 1.0)
    return out


def _unit_dispersion(summary: Summary, candidates: Sequence[str]) -> float:
    """How many times more the counted units vary between the arms than units counted once
    would (``count_dispersion`` over the unit clusters): a restart or another replica counts a
    unit again, on its own arm, which widens the split's spread but not its expected share."""
    per_cluster: dict[int, list[float]] = {}
    for column, arms in ((0, [BASELINE]), (1, candidates)):
        for arm in arms:
            for cluster, (n, _s) in summary.pooled(arm, UNITS).clusters.items():
                per_cluster.setdefault(cluster, [0.0, 0.0])[column] += n
    return count_dispersion(list(per_cluster.values())) if per_cluster else 1.0


def worst_segment(analysis: StageAnalysis, guardrail: str) -> Verdict | None:
    """The segment where ``guardrail`` looks worst (largest estimated harm), judged or not."""
    candidates = [v for v in analysis.verdicts
                  if v.guardrail == guardrail and v.segment is not None and math.isfinite(v.harm)]
    return max(candidates, key=lambda v: v.harm, default=None)


def unexcluded_harm(analysis: StageAnalysis) -> str:
    """Per guardrail, the largest harm a segment value has not yet excluded (the upper end of
    its interval), as one sentence for the record of a promotion: what the evidence still
    allows in the worst-placed segment."""
    worst: dict[str, Verdict] = {}
    for v in analysis.verdicts:
        if v.segment is None or not math.isfinite(v.harm_upper):
            continue
        if v.guardrail not in worst or v.harm_upper > worst[v.guardrail].harm_upper:
            worst[v.guardrail] = v
    parts = [f"{v.guardrail} up to {_fmt(v.harm_upper, v.rate, v.relative)} worse in {v.segment}"
             for _, v in sorted(worst.items())]
    return "; ".join(parts)


def describe_harm(analysis: StageAnalysis, limit: int = 3) -> str:
    """The harm verdicts as one sentence: global ones first (each with the segment where it is
    worst), then the segments."""
    ordered = sorted(analysis.harms,
                     key=lambda v: (v.segment is not None, v.guardrail, v.segment or ""))
    parts = []
    for v in ordered[:limit]:
        text = v.sentence
        if v.segment is None:
            worst = worst_segment(analysis, v.guardrail)
            if worst is not None:
                text += (f" (worst in {worst.segment}: "
                         f"{_fmt(worst.estimate, worst.rate, worst.relative, level=bool(worst.bound))})")
        parts.append(text)
    if len(ordered) > limit:
        parts.append(f"and {len(ordered) - limit} more")
    return "; ".join(parts)
