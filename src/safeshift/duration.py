"""``safeshift plan duration``: how long each stage needs to prove safety at a given traffic.

Before a rollout starts, for every stage and every guardrail judged in it: how many
observations each arm needs, and so how long the stage takes at the expected request rate,
for the engine to *prove safety* — the upper confidence bound of harm below the tolerance —
with probability 0.8 when the candidate is truly no worse (true difference 0).

It is the engine's own test, not a textbook formula: the one-sided always-valid bound of
:func:`safeshift.analysis.compare` (or :func:`~safeshift.analysis.bound` for absolute
bounds) at the plan's alpha, with the stage's tuning N* exactly as
:func:`safeshift.analysis.tuning_samples` computes it, on the time scale
:func:`safeshift.analysis.effective_n`. With arm sizes ``n_b`` and ``n_c`` at time t the
difference has standard error ``SE(t) = sqrt(σ_b²/n_b + σ_c²/n_c)`` — the real split, so at
1 % traffic the small candidate arm dominates — and the guardrail passes at t with
probability ``Φ(margin/SE(t) - m(t))``, m the boundary multiplier. A stage passes when all its
guardrails do; assuming independent guardrails its probability is the product, and the
stage's time is where that product reaches the power. The stage also waits for its
``min_duration`` and ``min_samples``. Monitoring continuously, a stage may pass earlier; this is
the time by which 80 % of stages will have passed.

The candidate arm gets ``traffic × rate`` requests per second and the baseline the rest; in a
shadow stage the baseline serves everything and the candidate sees the mirrored share.
Feedback metrics (labels) arrive for ``label_share`` of requests. Variances come from the
baseline level: p(1 - p) for rates; means need ``--baseline metric=mean:sd``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text
from scipy import optimize

from safeshift._units import BASIS_POINTS, format_duration, format_share
from safeshift.analysis import MIN_GLOBAL_SAMPLES, effective_n, tuning_samples
from safeshift.plan import BUILTIN_METRICS, Direction, Guardrail, Plan, Source, Stage
from safeshift.stats import boundary_multiplier

__all__ = [
    "DEFAULT_LEVELS",
    "POWER",
    "DurationReport",
    "GuardrailEstimate",
    "Level",
    "StageEstimate",
    "estimate_durations",
    "parse_baselines",
    "parse_rate",
    "render",
]

POWER = 0.8
"""Probability that a stage whose candidate is truly no worse has passed by its estimate."""

Level = float | tuple[float, float]
"""A baseline level: a rate (share of observations), or (mean, standard deviation)."""

DEFAULT_LEVELS: dict[str, float] = {
    "error_rate": 0.01,
    "accuracy": 0.9,
    "latency_ms>": 0.01,  # the share of latencies above a guardrail's threshold
    "disagreement": 0.02,
    "report_rate": 0.001,
}
"""Baseline levels assumed for rate metrics when ``--baseline`` does not give one."""

_MAX_SECONDS = 10 * 365 * 86400.0
"""Beyond ten years a stage counts as never finishing."""

_RATE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:e([+-]?\d+))?\s*(?:/\s*([a-z]+))?\s*$",
                   re.IGNORECASE)
_PER = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
        "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "d": 86400.0, "day": 86400.0}


def parse_rate(text: str) -> float:
    """Requests per second from ``50/s``, ``3000/m``, ``100000/h``, ``2e6/d`` or ``50``."""
    match = _RATE.match(text)
    unit = (match.group(3) or "s").lower() if match else ""
    if unit.endswith("s") and unit[:-1] in _PER and unit not in _PER:
        unit = unit[:-1]  # "minutes", "hours"
    if not match or unit not in _PER:
        raise ValueError(f"{text!r} is not a request rate; write it like 50/s, 3000/m or "
                         "100000/h")
    value = float(match.group(1) + (f"e{match.group(2)}" if match.group(2) else ""))
    if not value > 0:
        raise ValueError(f"{text!r}: the request rate must be more than 0")
    return value / _PER[unit]


def _is_rate_key(key: str) -> bool:
    metric = key.split(">", 1)[0]
    builtin = BUILTIN_METRICS.get(metric)
    return ">" in key or (builtin is not None and builtin.rate)


def parse_baselines(items: list[str]) -> dict[str, Level]:
    """Baseline levels from ``metric=value`` (a rate, e.g. ``error_rate=0.01`` or
    ``latency_ms>250=0.02``) or ``metric=mean:sd`` (a mean, e.g. ``latency_ms=120:45``)."""
    out: dict[str, Level] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ValueError(f"--baseline {item!r}: write metric=value (a rate, e.g. "
                             "error_rate=0.01) or metric=mean:sd (e.g. latency_ms=120:45)")
        try:
            if ":" in value:
                mean_text, _, sd_text = value.partition(":")
                mean, sd = float(mean_text), float(sd_text)
                if not (math.isfinite(mean) and math.isfinite(sd)) or sd <= 0:
                    raise ValueError
                out[key] = (mean, sd)
            else:
                level = float(value)
                if not 0.0 <= level <= 1.0:
                    raise ValueError(f"--baseline {item!r}: a rate lies between 0 and 1; for "
                                     "a mean give mean:sd, e.g. latency_ms=120:45")
                out[key] = level
        except ValueError as exc:
            if str(exc).startswith("--baseline"):
                raise
            raise ValueError(f"--baseline {item!r}: {value!r} is neither a rate (0..1) nor "
                             "mean:sd with sd > 0") from None
        if isinstance(out[key], tuple) and _is_rate_key(key):
            raise ValueError(f"--baseline {item!r}: {key} is a rate; give its level as one "
                             "number between 0 and 1")
    return out


@dataclass(slots=True)
class GuardrailEstimate:
    """What one guardrail needs in one stage. ``seconds`` is ``inf`` when it can never pass
    and ``None`` when it cannot be estimated (no baseline level)."""

    guardrail: str
    label: str
    kind: str  # "compare" (candidate against baseline) or "bound" (candidate alone)
    level: float | None
    sd: float | None
    assumed: bool
    margin: float | None
    relative: bool
    n_candidate: float | None = None
    n_baseline: float | None = None
    seconds: float | None = None
    note: str | None = None


@dataclass(slots=True)
class StageEstimate:
    """One stage: its traffic, the tuning N*, each guardrail and the time the stage needs."""

    name: str
    index: int
    traffic: str
    shadow: bool
    candidate_rate: float
    baseline_rate: float
    n_star: float | None
    min_duration: float
    max_duration: float | None
    min_samples: int
    guardrails: list[GuardrailEstimate] = field(default_factory=list)
    binding: str | None = None
    seconds_evidence: float | None = None
    seconds: float | None = None
    limited_by: str | None = None  # "evidence", "min_duration", "min_samples"
    suggested_expected_samples: int | None = None
    seconds_if_tuned: float | None = None
    warnings: list[str] = field(default_factory=list)
    note: str | None = None


@dataclass(slots=True)
class DurationReport:
    rollout: str
    rate: float
    label_share: float
    alpha: float
    power: float
    assumed: dict[str, float]
    stages: list[StageEstimate]
    unused: list[str] = field(default_factory=list)  # --baseline keys no guardrail reads

    @property
    def total_seconds(self) -> float | None:
        """Time until promotion if every stage takes its estimate (approvals not counted)."""
        total = 0.0
        for s in self.stages:
            if s.seconds is None:
                return None
            total += s.seconds
        return total

    def to_json(self) -> dict[str, Any]:
        data = _json_safe(asdict(self))
        data["total_seconds"] = _json_safe(self.total_seconds)
        return data  # type: ignore[no-any-return]


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _arm_rates(stage: Stage, rate: float) -> tuple[float, float]:
    """Requests per second on (baseline, candidate)."""
    if stage.is_shadow:
        return rate, rate * stage.shadow / BASIS_POINTS
    share = stage.traffic / BASIS_POINTS
    return rate * (1 - share), rate * share


def _default_key(g: Guardrail) -> str | None:
    if g.above is not None:
        return "latency_ms>" if g.metric == "latency_ms" else None
    return g.metric if g.metric in DEFAULT_LEVELS and g.info.rate else None


def _lookup(g: Guardrail, baselines: Mapping[str, Level]) -> tuple[Level | None, str | None]:
    """The guardrail's baseline level and the ``--baseline`` key it came from (None when
    assumed or unknown). An exceedance guardrail is looked up by its signal only
    (``latency_ms>250``): the metric's own level would be a mean."""
    for key in (g.key,) if g.above is not None else (g.key, g.metric):
        if key in baselines:
            return baselines[key], key
    default = _default_key(g)
    return (DEFAULT_LEVELS[default] if default is not None else None), None


class _Model:
    """Pass probability of one guardrail as a function of time."""

    def __init__(self, *, var_b: float, var_c: float, obs_b: float, obs_c: float,
                 margin: float, one_arm: bool, n_star: float, alpha: float,
                 scale: float = 1.0, min_n: float = MIN_GLOBAL_SAMPLES) -> None:
        self.min_n = min_n  # observations per arm before the engine judges at all
        self.var_b, self.var_c = var_b, var_c
        self.obs_b, self.obs_c = obs_b, obs_c
        self.margin = margin
        self.one_arm = one_arm
        self.n_star = n_star
        self.alpha = alpha
        self.scale = scale  # divides the standard error (relative tolerances)

    def arms(self, t: float) -> tuple[float, float]:
        return self.obs_b * t, self.obs_c * t

    def z(self, t: float) -> float:
        """margin/SE - m: the pass probability is Φ of this."""
        n_b, n_c = self.arms(t)
        if n_c <= 0 or (not self.one_arm and n_b <= 0):
            return -math.inf
        if self.one_arm:
            se = math.sqrt(self.var_c / n_c)
            n_eff = 4.0 * n_c
        else:
            se = math.sqrt(self.var_b / n_b + self.var_c / n_c)
            n_eff = effective_n(n_b, n_c)
        se /= self.scale
        m = boundary_multiplier(n_eff, self.n_star, self.alpha, one_sided=True)
        if se == 0:
            return math.inf if self.margin > 0 else -math.inf
        return self.margin / se - m

    def floor(self) -> float:
        """Seconds until the engine judges at all (``min_n`` per arm)."""
        rates = [self.obs_c] if self.one_arm else [self.obs_b, self.obs_c]
        return self.min_n / min(rates)


def _solve(models: list[_Model], power: float) -> float:
    """Smallest t where the product of the pass probabilities reaches ``power``; inf if never."""
    norm = NormalDist()

    def excess(log_t: float) -> float:
        t = math.exp(log_t)
        log_p = sum(math.log(max(norm.cdf(m.z(t)), 1e-300)) for m in models)
        return log_p - math.log(power)

    floor = max(m.floor() for m in models)
    lo, hi = math.log(floor), math.log(_MAX_SECONDS)
    if excess(hi) < 0:
        return math.inf
    if excess(lo) >= 0:
        return floor
    return math.exp(optimize.brentq(excess, lo, hi, xtol=1e-9, rtol=1e-10))


def _model(plan: Plan, stage: Stage, g: Guardrail, est: GuardrailEstimate, n_star: float,
           rate: float, label_share: float) -> _Model | None:
    """Fill ``est``'s margin; return its pass-probability model, or None when it has none."""
    info = g.info
    level, sd = est.level, est.sd
    if level is None:
        return None
    var = sd * sd if sd is not None else level * (1 - level)
    obs_b, obs_c = _arm_rates(stage, rate)
    if info.source is Source.FEEDBACK:
        obs_b, obs_c = obs_b * label_share, obs_c * label_share
    min_n = float(MIN_GLOBAL_SAMPLES)
    if g.prometheus is not None:  # one value per arm and interval, whatever the traffic
        obs_b = obs_c = 1.0 / g.prometheus.interval
        n_star = 2.0 * g.prometheus.expected_samples(stage)
        min_n = float(g.prometheus.min_samples)
    if est.kind == "bound":
        upper = g.max is not None or (g.min is None and info.bad is Direction.INCREASE)
        limit = float(g.max if g.max is not None else g.min if g.min is not None
                      else g.tolerance or 0.0)
        est.margin = limit - level if upper else level - limit
        return _Model(var_b=var, var_c=var, obs_b=obs_b, obs_c=obs_c, margin=est.margin,
                      one_arm=True, n_star=n_star, alpha=plan.analysis.alpha, min_n=min_n)
    scale = 1.0
    if g.relative_tolerance is not None:
        est.margin = g.relative_tolerance / BASIS_POINTS
        scale = abs(level)  # delta method at c = b: SE(c/b - 1) = SE(c - b) / b
    else:
        est.margin = float(g.tolerance or 0.0)
    if scale == 0:
        est.margin = 0.0
    return _Model(var_b=var, var_c=var, obs_b=obs_b, obs_c=obs_c, margin=est.margin,
                  one_arm=False, n_star=n_star, alpha=plan.analysis.alpha,
                  scale=scale if scale > 0 else 1.0, min_n=min_n)


def _estimate_stage(plan: Plan, index: int, rate: float, baselines: Mapping[str, Level],
                    label_share: float, assumed: dict[str, float], used: set[str],
                    n_star_override: float | None = None) -> StageEstimate:
    stage = plan.stages[index]
    base_rate, cand_rate = _arm_rates(stage, rate)
    traffic = (f"{format_share(stage.shadow)} shadow" if stage.is_shadow
               else format_share(stage.traffic))
    out = StageEstimate(stage.name, index, traffic, stage.is_shadow, cand_rate, base_rate, None,
                        stage.min_duration, stage.max_duration, stage.min_samples)
    if stage.is_full and stage.holdback is not None and stage.watch is not None:
        out.note = (f"promoted on entering it; then a {format_duration(stage.watch)} watch with "
                    f"{format_share(stage.holdback)} of units held back on the baseline")
        out.seconds = stage.watch
        return out
    if stage.is_full:
        out.note = "100% traffic: nothing left to compare; the rollout is promoted on entering it"
        out.seconds = 0.0
        return out
    if cand_rate <= 0 or base_rate <= 0:
        out.warnings.append("no hashed traffic on one arm (targeting rules only): cannot "
                            "estimate")
        return out
    n_star = n_star_override or tuning_samples(plan, stage)
    out.n_star = n_star
    models: dict[str, _Model] = {}
    unknown = []
    for g in plan.guardrails_for(stage):
        level, source = _lookup(g, baselines)
        was_assumed = source is None and level is not None
        if source is not None:
            used.add(source)
        kind = "bound" if g.is_bound or g.info.source is Source.SHADOW else "compare"
        mean, sd = (level if isinstance(level, tuple) else (level, None))
        if not g.info.rate and sd is None:
            mean = None  # a mean metric needs mean:sd
        if g.info.rate and isinstance(level, tuple):
            mean, sd = None, None
        est = GuardrailEstimate(g.key, g.describe(), kind, mean, sd, was_assumed, None,
                                g.relative_tolerance is not None)
        out.guardrails.append(est)
        if was_assumed and mean is not None:
            assumed[g.key] = mean
        model = _model(plan, stage, g, est, n_star, rate, label_share)
        if model is None:
            flag = f"metric=mean:sd, e.g. {g.metric}=120:40" if not g.info.rate else \
                   f"its rate, e.g. {g.key}=0.01"
            est.note = f"needs a baseline: pass --baseline {flag}"
            unknown.append(est.label)
            continue
        if est.margin is not None and est.margin <= 0:
            est.seconds = math.inf
            est.note = ("tolerance 0: safety can never be proven" if kind == "compare"
                        else "the baseline level is already at or beyond the bound")
            out.warnings.append(f"{est.label} can never pass ({est.note}); the stage cannot "
                                "advance on evidence")
            continue
        seconds = _solve([model], POWER)
        est.seconds = seconds
        n_b, n_c = model.arms(seconds) if math.isfinite(seconds) else (math.inf, math.inf)
        est.n_candidate = _ceil(n_c)
        est.n_baseline = None if kind == "bound" else _ceil(n_b)
        if not math.isfinite(seconds):
            est.note = "needs more than ten years"
        elif g.prometheus is not None:
            est.note = (f"interval values from Prometheus, one per arm every "
                        f"{format_duration(g.prometheus.interval)} (sd: of one value)")
        models[g.key] = model
    finite = [e for e in out.guardrails if e.seconds is not None]
    if finite:
        out.binding = max(finite, key=lambda e: e.seconds or 0.0).label
    if any(e.seconds == math.inf for e in out.guardrails):
        out.seconds_evidence = math.inf
    elif models:
        out.seconds_evidence = _solve(list(models.values()), POWER)
    else:
        out.seconds_evidence = 0.0
    sample_seconds = stage.min_samples / min(base_rate, cand_rate) if stage.min_samples else 0.0
    candidates = {"evidence": out.seconds_evidence, "min_duration": stage.min_duration,
                  "min_samples": sample_seconds}
    out.limited_by = max(candidates, key=lambda k: candidates[k])
    out.seconds = candidates[out.limited_by]
    if unknown:
        out.warnings.append(f"{', '.join(unknown)}: needs a baseline level; the time shown "
                            "leaves it out")
    if out.seconds == math.inf:
        pass
    elif stage.max_duration is not None and out.seconds > stage.max_duration:
        out.warnings.append(
            f"needs {format_duration(out.seconds)}, more than its max_duration of "
            f"{format_duration(stage.max_duration)}: at this traffic it will end inconclusive "
            f"(on_inconclusive: {plan.analysis.on_inconclusive})")
    return out


def _ceil(n: float) -> float:
    return float(math.ceil(n)) if math.isfinite(n) else n


def estimate_durations(plan: Plan, rate: float, baselines: Mapping[str, Level], *,
                       label_share: float = 1.0) -> DurationReport:
    """How long each stage of ``plan`` needs at ``rate`` requests per second."""
    if not rate > 0 or not math.isfinite(rate):
        raise ValueError(f"the request rate must be a positive number, got {rate!r}")
    if not 0 < label_share <= 1:
        raise ValueError(f"--label-share must lie in (0, 1], got {label_share!r}")
    assumed: dict[str, float] = {}
    used: set[str] = set()
    stages = []
    for i in range(len(plan.stages)):
        est = _estimate_stage(plan, i, rate, baselines, label_share, assumed, used)
        _suggest_tuning(plan, i, rate, baselines, label_share, est)
        stages.append(est)
    unused = sorted(set(baselines) - used)
    return DurationReport(plan.rollout, rate, label_share, plan.analysis.alpha, POWER, assumed,
                          stages, unused)


def _suggest_tuning(plan: Plan, index: int, rate: float, baselines: Mapping[str, Level],
                    label_share: float, est: StageEstimate) -> None:
    """If tuning the test to the samples the stage really needs (``expected_samples``) saves
    at least 10 % of its time, say so."""
    if (est.seconds_evidence is None or not math.isfinite(est.seconds_evidence)
            or est.limited_by != "evidence" or est.seconds_evidence <= 0):
        return
    stage = plan.stages[index]
    seconds = est.seconds_evidence
    expected = None
    for _ in range(4):  # N* and the time it implies settle in a few rounds
        expected = max(1, math.ceil(est.candidate_rate * seconds))
        tuned = stage.model_copy(update={"expected_samples": expected})
        n_star = tuning_samples(plan, tuned)
        trial = _estimate_stage(plan, index, rate, baselines, label_share, {}, set(), n_star)
        if trial.seconds_evidence is None or not math.isfinite(trial.seconds_evidence):
            return
        seconds = trial.seconds_evidence
    floor = max(stage.min_duration, (stage.min_samples / min(est.candidate_rate,
                                                              est.baseline_rate)))
    tuned_total = max(seconds, floor)
    if expected is not None and est.seconds is not None and tuned_total < 0.9 * est.seconds:
        est.suggested_expected_samples = expected
        est.seconds_if_tuned = tuned_total


# -- output ----------------------------------------------------------------------------------


def _n(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "never"
    return f"{math.ceil(value):,}"


def _t(value: float | None) -> str:
    """Durations to a useful precision: 52s, 26m53s, 21h25m, 3d4h."""
    if value is None:
        return "?"
    if not math.isfinite(value):
        return "never"
    if value >= 86400:
        return format_duration(round(value / 3600) * 3600)
    if value >= 3600:
        return format_duration(round(value / 60) * 60)
    return format_duration(value)


def render(report: DurationReport, console: Console) -> None:
    """A table: stage, traffic, samples per guardrail (the binding one named), time needed,
    the stage's min/max duration; then the warnings and tuning hints."""
    console.print(f"{report.rollout}: time each stage needs to prove safety at "
                  f"{report.rate:g} requests/s (power {report.power:.0%}, alpha "
                  f"{report.alpha:g}" + (f", labels on {report.label_share:.0%} of requests"
                                          if report.label_share < 1 else "") + ")",
                  markup=False)
    if report.assumed:
        console.print("assumed baseline levels (change with --baseline metric=value): "
                      + ", ".join(f"{k}={v:g}" for k, v in report.assumed.items()), markup=False)
    if report.unused:
        console.print("warning: no guardrail reads --baseline " + ", ".join(report.unused)
                      + "; name a metric (error_rate) or an exceedance signal (latency_ms>250)",
                      markup=False)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("stage / guardrail", overflow="fold")
    table.add_column("candidate", justify="right", no_wrap=True)
    table.add_column("baseline", justify="right", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    table.add_column("min / max", no_wrap=True)
    for k, s in enumerate(report.stages):
        limits = "promoted on entry" if s.note else "-"
        if not s.note:
            limits = (f"{_t(s.min_duration) if s.min_duration else '0s'} / "
                      f"{_t(s.max_duration) if s.max_duration else '-'}")
        need = "-" if s.n_star is None and s.seconds == 0 else _t(s.seconds)
        if s.limited_by in ("min_duration", "min_samples") and s.seconds:
            need += f" ({s.limited_by})"
        over = s.seconds is not None and s.max_duration is not None and s.seconds > s.max_duration
        table.add_row(Text(f"{s.name}: {s.traffic}", style="bold"),
                      f"{s.candidate_rate:g}/s" if s.n_star is not None else "",
                      f"{s.baseline_rate:g}/s" if s.n_star is not None else "",
                      Text(need, style="bold red" if over or s.seconds == math.inf else "bold"),
                      limits)
        for g in s.guardrails:
            label = f"  {g.guardrail}"
            if g.kind == "bound" and g.margin is not None and g.level is not None:
                label += f" (candidate ≤ {g.level + g.margin:g})"
            if g.label == s.binding and len(s.guardrails) > 1:
                label += " *"
            if g.seconds is None:
                table.add_row(label, "-", "-", "?", g.note or "")
                continue
            if g.seconds == math.inf:
                table.add_row(label, "-", "-", "never", g.note or "")
                continue
            table.add_row(label, _n(g.n_candidate),
                          "-" if g.kind == "bound" else _n(g.n_baseline), _t(g.seconds), "")
        if k < len(report.stages) - 1:
            table.add_section()
    console.print(table)
    console.print("* the binding guardrail; samples per arm at power "
                  f"{report.power:.0%} when the candidate is no worse", markup=False)
    for s in report.stages:
        for w in s.warnings:
            console.print(f"warning: stage {s.name!r}: {w}", markup=False)
        if s.suggested_expected_samples:
            console.print(f"hint: stage {s.name!r} is tuned for N* = {s.n_star:,.0f} effective "
                          f"samples; with expected_samples: {s.suggested_expected_samples} it "
                          f"would need {_t(s.seconds_if_tuned)} instead of {_t(s.seconds)}",
                          markup=False)
    total = report.total_seconds
    if total is not None and math.isfinite(total):
        console.print(f"all stages: about {_t(total)}, plus time waiting for approvals",
                      markup=False)
