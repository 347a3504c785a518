"""``safeshift plan duration``: parsing, the estimates, and a Monte-Carlo check that a stage
whose candidate is no worse passes by its estimated time in about 80 % of runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from safeshift.analysis import MIN_GLOBAL_SAMPLES, Status, bound, compare, tuning_samples
from safeshift.duration import (
    DEFAULT_LEVELS,
    DurationReport,
    StageEstimate,
    estimate_durations,
    parse_baselines,
    parse_rate,
)
from safeshift.plan import Plan
from safeshift.stats import sequential_samples_per_arm
from safeshift.telemetry import Moments

CHURN = Path(__file__).resolve().parents[1] / "examples" / "churn" / "plan.yaml"


def _plan(stages: list[dict[str, Any]], guardrails: list[dict[str, Any]],
          **analysis: Any) -> Plan:
    return Plan.from_dict({
        "rollout": "dur", "endpoint": "dur",
        "baseline": {"version": "v1", "model": "fake:a"},
        "candidate": {"version": "v2", "model": "fake:b"},
        "change": {"summary": "test"},
        "stages": stages, "guardrails": guardrails, "analysis": analysis or {},
    })


# -- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "per_second"), [
    ("50/s", 50.0), ("50", 50.0), ("3000/m", 50.0), ("3000/min", 50.0),
    ("100000/h", 100000 / 3600), ("1e5/hour", 100000 / 3600), ("86400/d", 1.0),
    (" 12.5 / s ", 12.5), ("120/minutes", 2.0),
])
def test_parse_rate(text: str, per_second: float) -> None:
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["", "fast", "0/s", "-5/s", "50/x", "50/s/s", "/s"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


def test_parse_baselines() -> None:
    got = parse_baselines(["error_rate=0.02", "latency_ms>250=0.05", "latency_ms=120:40",
                           "my_metric = 3.5:1.5"])
    assert got == {"error_rate": 0.02, "latency_ms>250": 0.05, "latency_ms": (120.0, 40.0),
                   "my_metric": (3.5, 1.5)}


@pytest.mark.parametrize(("item", "message"), [
    ("error_rate", "metric=value"),
    ("=0.1", "metric=value"),
    ("error_rate=", "metric=value"),
    ("error_rate=2", "between 0 and 1"),
    ("error_rate=abc", "neither a rate"),
    ("latency_ms=120:0", "sd > 0"),
    ("error_rate=0.1:0.2", "is a rate"),
    ("latency_ms>250=1:2", "is a rate"),
])
def test_parse_baselines_rejects_with_a_clear_message(item: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_baselines([item])


# -- estimates -------------------------------------------------------------------------------


def _stage(report: DurationReport, name: str) -> StageEstimate:
    return next(s for s in report.stages if s.name == name)


def test_churn_example() -> None:
    plan = Plan.load(CHURN)
    report = estimate_durations(plan, 50.0, {})
    assert [s.name for s in report.stages] == ["shadow", "canary", "early", "half", "full"]
    assert report.assumed == {"error_rate": DEFAULT_LEVELS["error_rate"],
                              "latency_ms>250": 0.01, "accuracy": 0.9, "disagreement": 0.02}
    shadow, canary, half = _stage(report, "shadow"), _stage(report, "canary"), _stage(report, "half")
    assert shadow.candidate_rate == 50 and shadow.baseline_rate == 50
    assert {g.guardrail for g in shadow.guardrails} == {"error_rate", "latency_ms>250",
                                                        "accuracy", "disagreement"}
    assert "disagreement" not in {g.guardrail for g in canary.guardrails}
    for s in (shadow, canary, half):
        assert s.binding == "error rate"
        assert s.n_star == pytest.approx(tuning_samples(plan, plan.stages[s.index]))
    # 1% traffic: the candidate arm is the bottleneck, the baseline gets 99x as much
    err = next(g for g in canary.guardrails if g.guardrail == "error_rate")
    assert err.n_baseline is not None and err.n_candidate is not None
    assert err.n_baseline / err.n_candidate == pytest.approx(99.0, rel=1e-3)
    assert canary.seconds is not None and canary.seconds > 10 * 3600
    assert half.limited_by == "min_duration" and half.seconds == 7200
    full = _stage(report, "full")
    assert full.seconds == 0 and full.note and not full.warnings
    text = json.dumps(report.to_json(), allow_nan=False)
    assert json.loads(text)["stages"][1]["guardrails"][0]["guardrail"] == "error_rate"


def test_equal_split_matches_the_power_module() -> None:
    """At 50/50 the engine's effective_n is 2n and the variance 2σ²/n: the textbook case."""
    plan = _plan([{"name": "half", "traffic": "50%"}], [{"metric": "error_rate",
                                                        "tolerance": 0.002}])
    est = estimate_durations(plan, 10.0, {}).stages[0].guardrails[0]
    n_star = tuning_samples(plan, plan.stages[0])
    expected = sequential_samples_per_arm(0.01 * 0.99, 0.002, alpha=0.05, power=0.8,
                                          n_star=n_star)
    assert est.n_candidate == math.ceil(expected)
    assert est.n_baseline == math.ceil(expected)


def test_unequal_split_uses_the_real_variance() -> None:
    """At 1 % the candidate arm carries almost all the variance: it needs about as many
    samples as *each* arm of an even split, and the stage takes ~50x longer."""
    g = [{"metric": "error_rate", "tolerance": 0.002}]
    even = estimate_durations(_plan([{"name": "s", "traffic": "50%", "expected_samples": 40000}],
                                    g), 100.0, {}).stages[0]
    small = estimate_durations(_plan([{"name": "s", "traffic": "1%", "expected_samples": 40000}],
                                     g), 100.0, {}).stages[0]
    n_even = even.guardrails[0].n_candidate
    n_small = small.guardrails[0].n_candidate
    assert n_even is not None and n_small is not None
    assert 0.45 < n_small / n_even < 0.75
    assert small.seconds is not None and even.seconds is not None
    assert small.seconds / even.seconds > 20


def test_tolerance_zero_can_never_pass() -> None:
    plan = _plan([{"name": "s", "traffic": "10%", "max_duration": "1h"}],
                 [{"metric": "error_rate", "tolerance": 0.0},
                  {"metric": "latency_ms", "above": 250, "tolerance": 0.01}])
    stage = estimate_durations(plan, 50.0, {}).stages[0]
    err = stage.guardrails[0]
    assert err.seconds == math.inf and err.note and "tolerance 0" in err.note
    assert stage.seconds == math.inf
    assert any("can never pass" in w for w in stage.warnings)
    assert json.dumps(estimate_durations(plan, 50.0, {}).to_json(), allow_nan=False)


def test_max_duration_warning_and_label_share() -> None:
    plan = _plan([{"name": "s", "traffic": "5%", "max_duration": "1h"}],
                 [{"metric": "accuracy", "tolerance": 0.01}])
    full = estimate_durations(plan, 50.0, {}).stages[0]
    third = estimate_durations(plan, 50.0, {}, label_share=0.25).stages[0]
    assert full.seconds is not None and third.seconds is not None
    assert third.seconds == pytest.approx(4 * full.seconds, rel=1e-6)
    assert any("max_duration" in w for w in third.warnings)
    with pytest.raises(ValueError, match="label-share"):
        estimate_durations(plan, 50.0, {}, label_share=0.0)


def test_means_need_a_baseline() -> None:
    plan = _plan([{"name": "s", "traffic": "20%"}],
                 [{"metric": "latency_ms", "tolerance": 5},
                  {"metric": "error_rate", "tolerance": 0.005}])
    stage = estimate_durations(plan, 50.0, {}).stages[0]
    lat = stage.guardrails[0]
    assert lat.seconds is None and lat.note and "needs a baseline" in lat.note
    assert any("needs a baseline" in w for w in stage.warnings)
    given = estimate_durations(plan, 50.0, {"latency_ms": (120.0, 40.0), "x": 0.1}).stages[0]
    assert given.guardrails[0].seconds is not None and given.guardrails[0].seconds > 0
    assert not given.guardrails[0].assumed
    assert estimate_durations(plan, 50.0, {"x": 0.1}).unused == ["x"]


def test_expected_samples_hint_is_consistent() -> None:
    plan = _plan([{"name": "s", "traffic": "50%"}], [{"metric": "error_rate",
                                                     "tolerance": 0.002}])
    stage = estimate_durations(plan, 50.0, {}).stages[0]
    assert stage.suggested_expected_samples is not None
    tuned = _plan([{"name": "s", "traffic": "50%",
                    "expected_samples": stage.suggested_expected_samples}],
                  [{"metric": "error_rate", "tolerance": 0.002}])
    again = estimate_durations(tuned, 50.0, {}).stages[0]
    assert again.seconds == pytest.approx(stage.seconds_if_tuned, rel=0.02)
    assert again.suggested_expected_samples is None


# -- Monte-Carlo: at the estimated time the stage passes in about 80 % of runs -----------------


def _rate_moments(rng: np.random.Generator, n: int, p: float, size: int) -> list[Moments]:
    x = rng.binomial(n, p, size)
    return [Moments(float(n), float(v), float(v)) for v in x]


def _mean_moments(rng: np.random.Generator, n: int, mean: float, sd: float,
                  size: int) -> list[Moments]:
    xbar = rng.normal(mean, sd / math.sqrt(n), size)
    s2 = sd**2 * rng.chisquare(n - 1, size) / (n - 1)
    return [Moments(float(n), n * m, (n - 1) * v + n * m * m) for m, v in zip(xbar, s2,
                                                                              strict=True)]


@pytest.mark.parametrize(("traffic", "guardrail", "level"), [
    ("50%", {"metric": "error_rate", "tolerance": 0.002}, 0.01),
    ("1%", {"metric": "error_rate", "tolerance": 0.002}, 0.01),
    ("10%", {"metric": "accuracy", "relative_tolerance": "2%"}, 0.9),
    ("30%", {"metric": "latency_ms", "tolerance": 4.0}, (120.0, 40.0)),
])
def test_monte_carlo_pass_rate_at_the_estimate(traffic: str, guardrail: dict[str, Any],
                                               level: float | tuple[float, float]) -> None:
    plan = _plan([{"name": "s", "traffic": traffic}], [guardrail])
    key = guardrail["metric"]
    report = estimate_durations(plan, 40.0, {key: level})
    stage = report.stages[0]
    est = stage.guardrails[0]
    assert est.seconds is not None and math.isfinite(est.seconds)
    n_b = round(stage.baseline_rate * est.seconds)
    n_c = round(stage.candidate_rate * est.seconds)
    g = plan.guardrails[0]
    rng = np.random.default_rng(7)
    runs = 600
    if isinstance(level, tuple):
        bs = _mean_moments(rng, n_b, *level, runs)
        cs = _mean_moments(rng, n_c, *level, runs)
    else:
        bs = _rate_moments(rng, n_b, level, runs)
        cs = _rate_moments(rng, n_c, level, runs)
    n_star = tuning_samples(plan, plan.stages[0])
    passed = sum(
        compare(g, b, c, n_star=n_star, alpha_harm=0.05, alpha_pass=0.05,
                min_n=MIN_GLOBAL_SAMPLES, segment=None).status is Status.PASS
        for b, c in zip(bs, cs, strict=True))
    assert 0.65 <= passed / runs <= 0.95, passed / runs


@pytest.mark.parametrize("limit", [{"max": 0.03}, {"tolerance": 0.03}],
                         ids=["max", "tolerance"])
def test_monte_carlo_bound_in_a_shadow_stage(limit: dict[str, float]) -> None:
    """A shadow metric is judged on the candidate alone; a tolerance on it is an upper
    bound (higher disagreement is worse), the same as ``max``."""
    plan = _plan([{"name": "shadow", "shadow": "20%"}],
                 [{"metric": "disagreement", **limit}])
    stage = estimate_durations(plan, 20.0, {}).stages[0]
    est = stage.guardrails[0]
    assert est.kind == "bound" and est.seconds is not None
    n_c = round(stage.candidate_rate * est.seconds)
    rng = np.random.default_rng(11)
    n_star = tuning_samples(plan, plan.stages[0])
    passed = sum(
        bound(plan.guardrails[0], c, n_star=n_star, alpha_harm=0.05, alpha_pass=0.05,
              min_n=MIN_GLOBAL_SAMPLES, segment=None).status is Status.PASS
        for c in _rate_moments(rng, n_c, DEFAULT_LEVELS["disagreement"], 600))
    assert 0.65 <= passed / 600 <= 0.95, passed / 600


def test_monte_carlo_two_guardrails_pass_together() -> None:
    """Two guardrails of equal difficulty: each alone would pass in ~89 %, both in ~80 %."""
    tol_acc = 0.002 * math.sqrt(0.09 / 0.0099)
    plan = _plan([{"name": "s", "traffic": "50%"}],
                 [{"metric": "error_rate", "tolerance": 0.002},
                  {"metric": "accuracy", "tolerance": tol_acc}])
    stage = estimate_durations(plan, 50.0, {}).stages[0]
    assert stage.seconds_evidence is not None
    singles = [g.seconds for g in stage.guardrails]
    assert singles[0] == pytest.approx(singles[1], rel=1e-3)
    assert stage.seconds_evidence > 1.15 * singles[0]  # type: ignore[operator]
    n = round(stage.candidate_rate * stage.seconds_evidence)
    rng = np.random.default_rng(5)
    n_star = tuning_samples(plan, plan.stages[0])
    both = 0
    runs = 600
    levels = (0.01, 0.9)
    draws = [(_rate_moments(rng, n, p, runs), _rate_moments(rng, n, p, runs)) for p in levels]
    for i in range(runs):
        both += all(
            compare(g, draws[j][0][i], draws[j][1][i], n_star=n_star, alpha_harm=0.025,
                    alpha_pass=0.05, min_n=MIN_GLOBAL_SAMPLES, segment=None).status
            is Status.PASS for j, g in enumerate(plan.guardrails))
    assert 0.65 <= both / runs <= 0.95, both / runs


# -- the command -----------------------------------------------------------------------------


def test_cli_text_and_json() -> None:
    from safeshift.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["plan", "duration", str(CHURN), "--rate", "50/s"])
    assert res.exit_code == 0, res.output
    assert "error_rate *" in res.output and "assumed baseline levels" in res.output
    assert "canary" in res.output and "promoted on entry" in res.output
    res = runner.invoke(app, ["plan", "duration", str(CHURN), "--rate", "3000/m", "--json",
                              "--baseline", "error_rate=0.02", "--label-share", "0.5"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["rate"] == 50 and data["label_share"] == 0.5
    assert "error_rate" not in data["assumed"]
    res = runner.invoke(app, ["plan", "duration", str(CHURN), "--rate", "fast"])
    assert res.exit_code == 2
