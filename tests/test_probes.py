"""Synthetic probes: golden inputs sent to the candidate on a schedule in every stage (shadow
included), never to users; a failing probe is a verdict of its own that rolls back, and every
stage waits for each probe to pass."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import ROOT, plan_dict
from typer.testing import CliRunner

from safeshift import FakeModel, MemoryStore, Phase, Plan, PlanValidationError, Rollout, VirtualClock
from safeshift.analysis import Status
from safeshift.cli import app as cli
from safeshift.controller import Lease
from safeshift.explain import explain
from safeshift.models import load_model
from safeshift.models.base import ModelResult
from safeshift.probes import COHORT, check
from safeshift.report import render_report
from safeshift.state import Action
from safeshift.store import SQLStore, sqlite_url
from safeshift.telemetry import Summary
from safeshift.view import rollout_view

CHURN = ROOT / "examples" / "churn" / "models"


def row(area: float, radius: float = 14.0) -> dict[str, float]:
    return {"mean_radius": radius, "mean_texture": 19.0, "mean_perimeter": 92.0,
            "mean_area": area}


GOLDEN: list[dict[str, Any]] = [
    {"name": "known-cases", "inputs": [row(300), row(2500)], "expect": [1, 0]},
    {"name": "scores-in-range", "inputs": [row(300), row(900), row(2500)], "range": [0, 1],
     "every": "30s"},
    {"name": "two-classes", "inputs": [row(300), row(2500)], "classes": [0, 1]},
    {"name": "risk-grows-with-area", "inputs": [row(a) for a in (2500, 300, 1500, 900)],
     "monotonic": {"feature": "mean_area", "direction": "decreasing"}},
]


def probe_plan(**changes: Any) -> Plan:
    data = plan_dict(probes=GOLDEN, **changes)
    data["stages"] = [{"name": "shadow", "shadow": "100%", "min_duration": "5m",
                       "min_samples": 200}, *data["stages"]]
    data["guardrails"] = [*data["guardrails"], {"metric": "disagreement", "stage": "shadow",
                                                "max": 0.5}]
    return Plan.from_dict(data)


def churn(version: str) -> Any:
    return load_model(f"joblib:{CHURN / f'churn_{version}.joblib'}")


def drive(rollout: Rollout, clock: VirtualClock, *, steps: int, rng: random.Random,
          per_step: int = 100) -> list[Any]:
    decisions = []
    for _ in range(steps):
        for _ in range(per_step):
            rollout.predict(row(rng.uniform(200, 2500), rng.uniform(8, 25)),
                            unit=f"u{rng.randrange(10**6)}", context={"country": "US"})
        clock.advance(10)
        d = rollout.tick()
        if d is not None:
            decisions.append(d)
        if rollout.state().phase.terminal:
            break
    return decisions


# -- the checks ---------------------------------------------------------------------------------


def probe(**fields: Any) -> Any:
    return Plan.from_dict(plan_dict(probes=[{"name": "p", "inputs": [row(300), row(2500)],
                                             **fields}])).probes[0]


def test_each_check_says_what_is_wrong() -> None:
    ok = ModelResult(outputs=[1, 0], scores=[0.8, 0.1])
    assert check(probe(expect=[1, 0]), ok) is None
    assert check(probe(expect=[1, 1]), ok) == "input 1: expected 1, got 0"
    assert check(probe(expect=[0.8, 0.1], tolerance=0.01),
                 ModelResult(outputs=[0.805, 0.1])) is None
    assert check(probe(expect=[0.8, 0.1]), ModelResult(outputs=[0.805, 0.1])) is not None
    assert check(probe(classes=[0, 1]), ok) is None
    assert "is not one of the classes" in str(check(probe(classes=[0, 1]),
                                                    ModelResult(outputs=[1, 7])))
    assert check(probe(range=[0, 1]), ok) is None
    assert check(probe(range=[0, 0.5]), ok) == "input 0: score 0.8 is outside [0, 0.5]"
    assert "not numbers" in str(check(probe(range=[0, 1]), ModelResult(outputs=["a", "b"])))
    assert check(probe(monotonic={"feature": "mean_area", "direction": "decreasing"}), ok) is None
    said = check(probe(monotonic={"feature": "mean_area"}), ok)
    assert said is not None and "not increasing" in said and "mean_area=2500" in said
    assert check(probe(classes=[0, 1]), ModelResult(error="boom")) == \
        "the candidate failed: boom"


@pytest.mark.parametrize(("fields", "needle"), [
    ({}, "a probe needs something to check"),
    ({"expect": [1]}, "expect has 1 outputs for 2 inputs"),
    ({"range": [1, 0]}, "must not be above"),
    ({"classes": []}, "classes"),
    ({"monotonic": {"feature": "age"}}, "a number for 'age'"),
    ({"classes": [0, 1], "every": "0s"}, "at least 1ms"),
    ({"classes": [0, 1], "max_failures": 0}, "max_failures"),
])
def test_a_probe_that_checks_nothing_or_cannot_hold_is_refused(fields: dict[str, Any],
                                                               needle: str) -> None:
    with pytest.raises(PlanValidationError) as err:
        probe(**fields)
    assert "probes.0" in str(err.value) and needle in str(err.value)


def test_validate_names_a_bad_probe_and_a_duplicate_name(tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "plan.yaml"
    for probes, needles in [
            ([{"name": "p", "inputs": [1], "classes": [0]},
              {"name": "p", "inputs": [2], "classes": [0]}], ["probes.1.name", "used twice"]),
            ([{"name": "q", "inputs": [], "classes": [0]}], ["probes.0.inputs"])]:
        path.write_text(yaml.safe_dump(plan_dict(probes=probes)))
        r = CliRunner().invoke(cli, ["validate", str(path)])
        assert r.exit_code == 2 and all(n in r.output for n in needles), r.output


# -- in a rollout -------------------------------------------------------------------------------


def test_a_good_candidate_passes_every_probe_in_every_stage_and_is_promoted(
        tmp_path: Path) -> None:
    store = SQLStore(sqlite_url(tmp_path / "s.db"))
    clock = VirtualClock()
    rollout = Rollout.from_plan(probe_plan(), store=store, clock=clock,
                                models={"baseline": churn("v1"), "candidate": churn("v2")})
    decisions = drive(rollout, clock, steps=400, rng=random.Random(1))
    assert [d.action for d in decisions] == [Action.ADVANCE, Action.ADVANCE, Action.PROMOTE]
    for d in decisions:  # each stage waited for each probe's pass
        probes = {v["guardrail"]: v for v in d.evidence["verdicts"] if v["test"] == "probe"}
        assert set(probes) == {f"probe:{p['name']}" for p in GOLDEN}
        assert all(v["status"] == "pass" and v["n_candidate"] >= 1 for v in probes.values())
    # the runs are telemetry of their own cohort, every 60 s (30 s for one), in every stage
    shadow = Summary.from_rows(store.telemetry_totals("test-rollout", 0))
    runs = {p["name"]: shadow.total("candidate", f"probe:{p['name']}", cohort=COHORT)
            for p in GOLDEN}
    assert all(m.s == 0 for m in runs.values())
    assert runs["scores-in-range"].n >= 2 * runs["known-cases"].n - 1 > 0
    # and a stored decision that read them is re-derived word for word
    assert explain(store, "test-rollout", decisions[0].seq).matches


def test_a_candidate_that_fails_a_probe_is_rolled_back_in_shadow_before_any_user() -> None:
    store = MemoryStore()
    clock = VirtualClock()
    wrong = FakeModel(output=7)  # answers every input with a class the plan does not know
    rollout = Rollout.from_plan(probe_plan(), store=store, clock=clock,
                                models={"baseline": churn("v1"), "candidate": wrong})
    decisions = drive(rollout, clock, steps=20, rng=random.Random(2))
    assert [d.action for d in decisions] == [Action.ROLLBACK]
    rollback = decisions[0]
    assert rollback.from_stage == 0 and rollback.phase is Phase.ROLLED_BACK
    assert "probe known-cases" in rollback.reason and "failed 1 of 1 runs" in rollback.reason
    harm = [v for v in rollback.evidence["verdicts"] if v["status"] == "harm"]
    assert {v["guardrail"] for v in harm} >= {"probe:known-cases", "probe:two-classes"}
    # probes never reach users nor the request counts: the candidate saw only the shadow
    # copies of the users' requests (each user got the baseline's answer)
    summary = Summary.from_rows(store.telemetry_totals("test-rollout", 0))
    users = summary.total("baseline", "requests").n
    assert users == 100 and summary.total("candidate", "requests").n == users
    # the report (and the dashboard, from the same view) shows each probe's verdict
    view = rollout_view(store, "test-rollout", clock)
    shown = {p["key"]: p for p in view["probes"]}
    assert shown["probe:known-cases"]["class"] == "harm"
    # a constant answer is (weakly) monotonic: that probe passed
    assert shown["probe:risk-grows-with-area"]["class"] == "safe"
    text = render_report(view, "md")
    assert "## Probes" in text and "probe known-cases: 2 golden inputs" in text


def test_max_failures_tolerates_a_flaky_run() -> None:
    data = plan_dict(probes=[{"name": "flaky", "inputs": [row(300)], "classes": [0, 1],
                              "every": "10s", "max_failures": 3}])
    clock = VirtualClock()
    flaky = FakeModel(output=1, error_rate=0.2, seed=5)
    rollout = Rollout.from_plan(Plan.from_dict(data), store=MemoryStore(), clock=clock,
                                models={"baseline": FakeModel(output=1), "candidate": flaky})
    rollout.tick()
    statuses = []
    for _ in range(12):
        clock.advance(10)
        rollout.tick()
        analysis = rollout.analysis()
        assert analysis is not None
        v = next(v for v in analysis.verdicts if v.guardrail == "probe:flaky")
        statuses.append(v.status)
        if rollout.state().phase.terminal:
            break
    assert Status.PASS in statuses  # a failed run or two pass: below max_failures
    assert rollout.probes is not None and rollout.probes.runs >= 3


def test_only_the_process_that_decides_sends_probes(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "s.db")
    clock = VirtualClock()
    plan = probe_plan()
    models = {"baseline": churn("v1"), "candidate": churn("v2")}
    a = Rollout.from_plan(plan, store=SQLStore(url), clock=clock, models=models, start=False)
    b = Rollout.from_plan(plan, store=SQLStore(url), clock=clock, models=models, start=False)
    a.controller.lease = Lease("replica-a", 30.0)
    b.controller.lease = Lease("replica-b", 30.0)
    for _ in range(5):
        a.tick()
        b.tick()
        clock.advance(60)
    assert a.probes is not None and b.probes is not None
    assert a.probes.runs == 5 * len(GOLDEN) and b.probes.runs == 0


def test_a_simulation_sends_no_probes() -> None:
    from safeshift.simulate import SCENARIOS, simulate

    story = simulate(probe_plan(), SCENARIOS["good"], max_hours=2)
    assert story.outcome is Phase.PROMOTED
