"""Consent: units without it always get the baseline, are never mirrored, count in no
comparison, and the split check stays right."""

from __future__ import annotations

import random

import pytest
from tests.conftest import plan_dict

from safeshift import FakeModel, MemoryStore, Plan, Rollout, VirtualClock
from safeshift.analysis import analyse
from safeshift.assign import Reason
from safeshift.errors import UnknownRequestError
from safeshift.state import Action
from safeshift.telemetry import Summary

CONSENT = {"attribute": "analytics", "granted": ["yes"]}


def _rollout(plan: Plan, store: MemoryStore, clock: VirtualClock) -> Rollout:
    return Rollout.from_plan(plan, store=store, clock=clock, models={
        "baseline": FakeModel(output=1), "candidate": FakeModel(output=2)})


def test_units_without_consent_get_the_baseline_and_count_nowhere() -> None:
    store, clock = MemoryStore(), VirtualClock()
    plan = Plan.from_dict(plan_dict(consent=CONSENT, stages=[
        {"name": "canary", "traffic": "50%", "min_duration": "1h"}, {"name": "full", "traffic": "100%"}]))
    rollout = _rollout(plan, store, clock)
    rng = random.Random(2)
    refused = []
    for i in range(3000):
        given = rng.choice(["yes", "no", None, "YES"])
        context = {"country": "BR"} if given is None else {"country": "BR", "analytics": given}
        p = rollout.predict({"x": 1}, unit=f"u{i}", context=context)
        if given not in ("yes", "YES"):
            assert p.arm == "baseline" and p.outputs == [1]
            assert rollout.assign(f"u{i}", context).reason is Reason.NO_CONSENT
            refused.append(p.id)
    rollout.flush()
    summary = Summary.from_rows(store.telemetry_totals(plan.rollout, 0))
    consented = 3000 - len(refused)
    counted = sum(summary.total(arm, "requests").n for arm in ("baseline", "candidate"))
    assert counted == consented  # the comparison sees consenting units only
    assert summary.total("baseline", "requests", cohort="no_consent").n == len(refused)
    assert summary.total("candidate", "requests", cohort="no_consent").n == 0
    analysis = analyse(plan, 0, summary)
    assert analysis.n_baseline + analysis.n_candidate == consented
    # nothing is kept that a label could join to
    with pytest.raises(UnknownRequestError):
        rollout.feedback(refused[0], label=1)


def test_no_mirroring_without_consent() -> None:
    store, clock = MemoryStore(), VirtualClock()
    plan = Plan.from_dict(plan_dict(consent=CONSENT, stages=[
        {"name": "shadow", "shadow": "100%", "min_duration": "1h"},
        {"name": "full", "traffic": "100%"}]))
    rollout = _rollout(plan, store, clock)
    for i in range(200):
        rollout.predict({"x": 1}, unit=f"u{i}", context={"analytics": "no"})
    assert not any(rollout.assign(f"u{i}", {"analytics": "no"}).shadow for i in range(200))
    rollout.flush()
    summary = Summary.from_rows(store.telemetry_totals(plan.rollout, 0))
    assert summary.total("candidate", "requests", cohort="no_consent").n == 0
    assert summary.total("candidate", "requests").n == 0


def test_the_split_check_stays_right_with_half_the_units_refusing() -> None:
    """If refusing units were counted on the baseline, the candidate's share of a 10% canary
    would look like 5% and the check would pause every rollout; it must not pause."""
    paused = 0
    shares = []
    runs = 30
    for seed in range(runs):
        store, clock = MemoryStore(), VirtualClock()
        plan = Plan.from_dict(plan_dict(consent=CONSENT, stages=[
            {"name": "canary", "traffic": "10%", "min_duration": "6h"},
            {"name": "full", "traffic": "100%"}], analysis={"alpha": 0.05, "srm_alpha": 0.01}))
        rollout = _rollout(plan, store, clock)
        rng = random.Random(seed)
        for _ in range(20):
            for _ in range(200):
                unit = rng.randrange(100_000)
                # consent is a property of the unit: the same answer on every request
                given = "yes" if random.Random(unit).random() < 0.5 else "no"
                rollout.predict({"x": 1}, unit=f"u{unit}", context={"analytics": given})
            clock.advance(60)
            decision = rollout.tick()
            if decision is not None and decision.action is Action.PAUSE:
                paused += 1
                break
        summary = Summary.from_rows(store.telemetry_totals(plan.rollout, 0))
        b, c = summary.total("baseline", "units").n, summary.total("candidate", "units").n
        shares.append(c / (b + c))
    assert paused <= 2, f"{paused} of {runs} healthy rollouts paused for a split mismatch"
    mean_share = sum(shares) / len(shares)
    assert abs(mean_share - 0.10) < 0.01, mean_share
