"""Guardrails measured by Prometheus: what a plan may ask (and what it is refused because the
test could not be valid), how an answer is read, that the paired test keeps its false-rollback
rate on values that drift together, and that a Prometheus without fresh values holds every
step forward but never a rollback. (A real Prometheus scraping a real gateway:
tests/gateway/test_gateway_prometheus.py.)"""

from __future__ import annotations

import math
import socket
from typing import Any

import numpy as np
import pytest
from tests.conftest import plan_dict

from safeshift import MemoryStore, Phase, Plan, PlanValidationError, Rollout, VirtualClock
from safeshift.analysis import Status, analyse
from safeshift.assign import BASELINE, CANDIDATE
from safeshift.plan import prom_ranges
from safeshift.promql import PromError, parse_answer
from safeshift.telemetry import NO_CLUSTER, Moments, Summary

QUERY = 'histogram_quantile(0.95, sum by (le) (rate(x_bucket{arm="{{arm}}"}[15s])))'


def dead_url() -> str:
    """A loopback URL nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def guard(**changes: Any) -> dict[str, Any]:
    g: dict[str, Any] = {"metric": "p95_ms", "direction": "increase", "tolerance": 5,
                         "prometheus": {"url": "http://prometheus:9090", "query": QUERY}}
    g.update(changes)
    return g


def prom_plan(*guards: dict[str, Any], **changes: Any) -> Plan:
    data = plan_dict(guardrails=list(guards or [guard()]), **changes)
    return Plan.from_dict(data)


# -- the plan -----------------------------------------------------------------------------------


def test_a_prometheus_guardrail_is_read_with_its_defaults() -> None:
    g = prom_plan().guardrails[0]
    assert g.info.source == "prometheus" and not g.info.rate
    assert g.prometheus is not None and g.prometheus.interval == 15.0
    assert g.prometheus.min_samples == 20 and g.prometheus.statistic == "mean"
    assert g.prometheus.render(arm="candidate", version="v2", stage="canary") == QUERY.replace(
        "{{arm}}", "candidate")


@pytest.mark.parametrize(("changes", "field", "words"), [
    ({"metric": "latency_ms"}, "guardrails.0.metric", "measured by safeshift itself"),
    ({"above": 250}, "guardrails.0.above", "write the share in PromQL"),
    ({"source": "feedback"}, "guardrails.0.source", "not from feedback"),
    ({"prometheus": {"url": "http://p", "query": "sum(rate(x[5m]))"}},
     "guardrails.0.prometheus.query", "tell the arms apart"),
    ({"prometheus": {"url": "http://p", "query": 'x{arm="{{arm}}", z="{{zone}}"}'}},
     "guardrails.0.prometheus.query", "unknown placeholder {{zone}}"),
    ({"prometheus": {"url": "http://p", "query": 'rate(x{arm="{{arm}}"}[5m])'}},
     "guardrails.0.prometheus", "the range [5m] is longer than the interval (15s)"),
    ({"prometheus": {"url": "http://p", "query": 'max_over_time(x{arm="{{arm}}"}[1m:5s])'}},
     "guardrails.0.prometheus", "the range [1m] is longer"),
    ({"prometheus": {"url": "http://p", "query": 'rate(x{arm="{{arm}}"}[5q])'}},
     "guardrails.0.prometheus.query", "not a PromQL duration"),
    ({"prometheus": {"url": "http://p", "query": QUERY, "interval": "500ms"}},
     "guardrails.0.prometheus.interval", "at least 1s"),
    ({"prometheus": {"url": "http://p", "query": QUERY, "min_samples": 3}},
     "guardrails.0.prometheus.min_samples", "greater than or equal to 10"),
    ({"prometheus": {"url": "http://p", "query": QUERY, "timeout": "1m"}},
     "guardrails.0.prometheus.timeout", "at most 30s"),
    ({"strict": True, "tolerance": None}, "guardrails.0.strict", "fixed mix of units"),
    ({"prometheus": {"url": "http://p", "query": QUERY, "token_env": "SAFESHIFT_AUDIT_KEY"}},
     "guardrails.0.prometheus.token_env", "named PROMETHEUS_*"),
    ({"prometheus": {"url": "prometheus:9090", "query": QUERY}},
     "guardrails.0.prometheus.url", "not an http(s) URL"),
    ({"prometheus": None, "source": "prometheus"}, "guardrails.0.prometheus",
     "required with source: prometheus"),
])
def test_a_guardrail_whose_test_could_not_be_valid_is_refused(
        changes: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(PlanValidationError) as err:
        prom_plan(guard(**changes))
    problems = {p.path: p.message for p in err.value.problems}
    assert field in problems, problems
    assert words in problems[field]


def test_a_stored_plan_reads_back() -> None:
    plan = prom_plan()
    again = Plan.from_dict(plan.canonical())
    assert again.hash == plan.hash and again.guardrails[0].prometheus == plan.guardrails[0].prometheus


def test_one_metric_name_has_one_source() -> None:
    with pytest.raises(PlanValidationError) as err:
        prom_plan(guard(), {"metric": "p95_ms", "direction": "increase", "tolerance": 1,
                            "stage": "half"})
    assert "from another source" in str(err.value)


def test_range_selectors_are_found_outside_strings() -> None:
    assert prom_ranges('sum(rate(x{p=~"[a-z]+", arm="{{arm}}"}[30s])) / '
                       "sum(rate(y[1m30s] offset 5m))") == [("30s", 30.0), ("1m30s", 90.0)]
    assert prom_ranges('avg_over_time(x[10m:1m]) + y{l="[5m]"}') == [("10m", 600.0)]


# -- an answer ------------------------------------------------------------------------------------


def vector(*values: str) -> dict[str, Any]:
    return {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"arm": "candidate", "pod": f"p{i}"}, "value": [1.0, v]}
        for i, v in enumerate(values)]}}


def test_an_answer_is_one_number_or_no_data() -> None:
    assert parse_answer(vector("12.5")) == 12.5
    assert parse_answer({"status": "success",
                         "data": {"resultType": "scalar", "result": [1.0, "3"]}}) == 3.0
    assert parse_answer(vector()) is None  # no requests in the interval: no data
    assert parse_answer(vector("NaN")) is None  # 0/0
    assert parse_answer(vector("+Inf")) is None


@pytest.mark.parametrize(("body", "words"), [
    (vector("1", "2"), "answered 2 series (labels arm, pod)"),
    ({"status": "error", "errorType": "bad_data", "error": "parse error"},
     "rejected the query (bad_data: parse error)"),
    ({"status": "success", "data": {"resultType": "matrix", "result": []}}, "a matrix result"),
    (vector("abc"), "not a number"),
    ([1, 2], "not a Prometheus query result"),
])
def test_an_answer_that_is_not_one_number_is_a_problem(body: Any, words: str) -> None:
    with pytest.raises(PromError, match=None) as err:
        parse_answer(body)
    assert words in str(err.value)


# -- the test on interval values ------------------------------------------------------------------


def summary_of(base: list[float], cand: list[float]) -> Summary:
    def moments(values: list[float]) -> Moments:
        return Moments(float(len(values)), float(sum(values)), float(sum(v * v for v in values)))

    diffs = [c - b for b, c in zip(base, cand, strict=True)]
    return Summary(cells={
        (BASELINE, "hash", "", NO_CLUSTER): {"p95_ms": moments(base)},
        (CANDIDATE, "hash", "", NO_CLUSTER): {"p95_ms": moments(cand),
                                              "p95_ms:paired": moments(diffs)}})


def runs(plan: Plan, *, harm: float, n_runs: int, looks: int, seed: int,
         users: int = 0, user_sd: float = 30.0, active: int = 50) -> list[int | None]:
    """For each run, the look at which the p95 guardrail proved harm (None: never): values
    that drift together (an AR(1) load shared by both arms, rho 0.95) plus skewed noise; with
    ``users``, each arm also has its own fixed mix of that many units whose levels differ
    (sd ``user_sd``), ``active`` of them in each interval — a difference between the arms'
    mixes that more intervals never average away."""
    rng = np.random.default_rng(seed)
    out: list[int | None] = []
    for _ in range(n_runs):
        load = np.zeros(looks)
        for t in range(1, looks):
            load[t] = 0.95 * load[t - 1] + rng.normal(0, 6)
        base = 100 + load + rng.gamma(2.0, 2.0, looks)
        cand = 100 + harm + load + rng.gamma(2.0, 2.0, looks)
        if users:
            for arm in (base, cand):
                levels = rng.normal(0, user_sd, users)
                arm += [levels[rng.integers(0, users, active)].mean() for _ in range(looks)]
        found = None
        for t in range(10, looks + 1, 2):
            a = analyse(plan, 0, summary_of(list(base[:t]), list(cand[:t])))
            v = next(v for v in a.verdicts if v.guardrail == "p95_ms")
            if v.status is Status.HARM:
                found = t
                break
        out.append(found)
    return out


def test_identical_models_are_rarely_rolled_back_on_values_that_drift_together() -> None:
    # a tolerance of 2 against values whose interval noise is about 6 per arm, two thousand
    # units per arm whose levels differ by 30 (sd): the arms' fixed mixes differ by about 1
    plan = prom_plan(guard(tolerance=2, prometheus={"url": "http://p", "query": QUERY,
                                                    "min_samples": 10}))
    found = runs(plan, harm=0.0, n_runs=400, looks=120, seed=7, users=2000)
    rate = sum(f is not None for f in found) / len(found)
    # alpha 0.05; three binomial standard errors of slack over 400 runs
    assert rate <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 400), rate


def test_a_regression_is_caught_on_the_same_noisy_values() -> None:
    plan = prom_plan(guard(prometheus={"url": "http://p", "query": QUERY, "min_samples": 10}))
    found = runs(plan, harm=12.0, n_runs=100, looks=120, seed=8, users=2000)  # tolerance 5
    assert sum(f is not None for f in found) >= 95
    assert np.median([f for f in found if f is not None]) <= 60


# -- holding on a Prometheus without fresh values ---------------------------------------------------


def held_rollout(url: str) -> tuple[Rollout, VirtualClock]:
    plan = prom_plan(guard(prometheus={"url": url, "query": QUERY, "interval": "15s",
                                       "min_samples": 10, "timeout": "1s"}),
                     stages=[{"name": "canary", "traffic": "10%", "min_duration": "1m"},
                             {"name": "full", "traffic": "100%"}])
    clock = VirtualClock()
    return Rollout.from_plan(plan, store=MemoryStore(), clock=clock), clock


def record(rollout: Rollout, harm: float, n: int = 20) -> None:
    rng = np.random.default_rng(1)
    for _ in range(n):
        b = 100 + rng.normal(0, 1)
        c = b + harm + rng.normal(0, 1)
        rollout._observe_value(0, BASELINE, "p95_ms", b)
        rollout._observe_value(0, CANDIDATE, "p95_ms", c)
        rollout._observe_value(0, CANDIDATE, "p95_ms:paired", c - b)
    rollout.flush()


def unreachable(rollout: Rollout) -> None:
    """One tick that reads Prometheus (which fails), and the read finished."""
    rollout.tick()
    assert rollout.promql is not None
    rollout.promql.wait(10)


def test_an_unreachable_prometheus_holds_a_passing_stage_and_says_so() -> None:
    url = dead_url()
    rollout, clock = held_rollout(url)
    unreachable(rollout)
    record(rollout, harm=0.0)
    clock.advance(120)
    assert rollout.tick() is None
    state = rollout.state()
    assert state.phase is Phase.RUNNING and state.stage_index == 0
    assert state.reason.startswith("holding, no fresh measurements: guardrail p95_ms: "
                                   f"Prometheus at {url} cannot be reached")
    a = rollout.analysis()
    assert a is not None and a.all_pass  # the evidence alone would have promoted
    # once Prometheus answers again (here: the problem gone), the stage passes on its evidence
    assert rollout.promql is not None
    rollout.promql.problems.clear()
    decision = rollout.tick()
    assert decision is not None and decision.phase is Phase.PROMOTED


def test_an_unreachable_prometheus_never_holds_a_rollback() -> None:
    rollout, clock = held_rollout(dead_url())
    unreachable(rollout)
    record(rollout, harm=30.0)
    clock.advance(5)
    decision = rollout.tick()
    assert decision is not None and decision.phase is Phase.ROLLED_BACK
    assert "p95 ms" in decision.reason and "values read at the same instants" in decision.reason


def test_the_reason_comes_back_when_prometheus_answers_again() -> None:
    rollout, _clock = held_rollout(dead_url())
    before = rollout.state().reason
    unreachable(rollout)
    rollout.tick()
    assert rollout.state().reason.startswith("holding, no fresh measurements")
    assert rollout.promql is not None
    rollout.promql.problems.clear()
    rollout.tick()
    assert rollout.state().reason == before


def test_plan_duration_counts_interval_values_not_requests() -> None:
    from safeshift.duration import estimate_durations

    plan = prom_plan(guard(prometheus={"url": "http://p", "query": QUERY, "interval": "30s",
                                       "min_samples": 20}),
                     stages=[{"name": "canary", "traffic": "50%", "min_duration": "1m"},
                             {"name": "full", "traffic": "100%"}])
    fast, slow = (estimate_durations(plan, rate, {"p95_ms": (120.0, 3.0)}) for rate in (1000, 1))
    est = [next(g for g in report.stages[0].guardrails if g.guardrail == "p95_ms")
           for report in (fast, slow)]
    # the request rate changes nothing: twenty values, one every 30 s, at the least
    assert est[0].seconds == est[1].seconds == 600.0
    assert est[0].n_candidate == 20
