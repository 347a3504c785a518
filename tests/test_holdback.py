"""The watch after promotion: a holdback of units stays on the baseline for the plan's watch,
the guardrails keep judging it with the same tests, and a regression proven in that time rolls
back at once. Without a holdback nothing changes."""

from __future__ import annotations

import random
from typing import Any

import pytest
from tests.conftest import plan_dict
from typer.testing import CliRunner

from safeshift import FakeModel, InvalidTransitionError, MemoryStore, Phase, Plan, Rollout, VirtualClock
from safeshift.assign import BASELINE
from safeshift.audit import verify_chain
from safeshift.cli import app as cli
from safeshift.controller import next_stage
from safeshift.state import Action, Decision
from safeshift.store import SQLStore, sqlite_url

COUNTRIES = ["US", "BR", "IN", "GB"]


def holdback_plan(holdback: str | None = "5%", watch: str = "2h") -> Plan:
    data = plan_dict()
    if holdback is not None:
        data["stages"][-1].update(holdback=holdback, watch=watch)
    return Plan.from_dict(data)


def traffic(rollout: Rollout, clock: VirtualClock, *, steps: int, per_step: int = 200,
            rng: random.Random, until: Phase | None = None) -> list[Decision]:
    """Serve ``per_step`` requests from random units every 10 virtual seconds and tick; stop
    at a terminal phase or when the rollout reaches ``until``."""
    decisions = []
    for _ in range(steps):
        for _ in range(per_step):
            rollout.predict({"x": 1}, unit=f"u{rng.randrange(1_000_000)}",
                            context={"country": rng.choice(COUNTRIES)})
        clock.advance(10)
        d = rollout.tick()
        if d is not None:
            decisions.append(d)
        phase = rollout.state().phase
        if phase.terminal or phase is until:
            break
    return decisions


def make(plan: Plan, candidate: FakeModel, store: Any = None) -> tuple[Rollout, VirtualClock]:
    clock = VirtualClock()
    rollout = Rollout.from_plan(plan, store=store or MemoryStore(), clock=clock,
                                models={"baseline": FakeModel(output=1), "candidate": candidate})
    return rollout, clock


def test_promotion_enters_the_watch_and_the_holdback_keeps_the_baseline() -> None:
    plan = holdback_plan()
    rollout, clock = make(plan, FakeModel(output=1))
    decisions = traffic(rollout, clock, steps=400, rng=random.Random(1), until=Phase.WATCHING)
    assert [d.action for d in decisions] == [Action.ADVANCE, Action.PROMOTE]
    promote = decisions[-1]
    assert promote.phase is Phase.WATCHING and promote.to_stage == 2
    assert "watching 5% of units held back on the baseline for 2h" in promote.reason
    # the split: 95% candidate, the top 5% of hash buckets on the baseline
    split = rollout.split()
    assert split.active and split.traffic == 9_500 and not split.serve_candidate_to_all
    arms = [rollout.assign(f"w{i}", {}).arm for i in range(20_000)]
    assert 0.04 < arms.count(BASELINE) / len(arms) < 0.06
    status = rollout.status()
    assert status.phase is Phase.WATCHING and status.watch is not None
    assert status.watch["holdback"] == 500 and status.watch["watch"] == 7200
    assert 0 < status.watch["remaining"] <= 7200
    assert status.to_json()["watch"]["holdback"] == 0.05


def test_units_on_the_candidate_before_promotion_stay_on_it_during_the_watch() -> None:
    plan = holdback_plan()
    rollout, clock = make(plan, FakeModel(output=1))
    rng = random.Random(2)
    while rollout.state().stage_index < 1:  # until stage "half" (50%)
        traffic(rollout, clock, steps=1, rng=rng)
    units = [f"k{i}" for i in range(5_000)]
    at_half = {u for u in units if rollout.assign(u, {}).is_candidate}
    traffic(rollout, clock, steps=400, rng=rng, until=Phase.WATCHING)
    assert rollout.state().phase is Phase.WATCHING
    watching = {u for u in units if rollout.assign(u, {}).is_candidate}
    assert at_half <= watching  # monotone: nobody goes back to the baseline


def test_a_quiet_watch_ends_in_promotion_after_its_time() -> None:
    plan = holdback_plan(watch="30m")
    store = MemoryStore()
    rollout, clock = make(plan, FakeModel(output=1), store)
    decisions = traffic(rollout, clock, steps=2_000, rng=random.Random(6))
    assert [d.action for d in decisions] == [Action.ADVANCE, Action.PROMOTE, Action.END_WATCH]
    watch_started, ended = decisions[1].at, decisions[2].at
    assert 1800 <= ended - watch_started <= 1810
    assert "the watch after promotion ended: no regression proven" in decisions[2].reason
    assert decisions[2].evidence["verdicts"], "the evidence of the last look is kept"
    assert rollout.state().phase is Phase.PROMOTED and rollout.status().watch is None
    assert rollout.assign("anyone", {}).is_candidate  # everyone, the holdback included
    assert verify_chain(store.audit_events(plan.rollout))[0]
    assert [e.action for e in store.audit_events(plan.rollout)] == [
        "start", "advance", "promote", "end_watch"]


def test_a_regression_that_starts_after_promotion_is_rolled_back() -> None:
    plan = holdback_plan(watch="24h")
    candidate = FakeModel(output=1, seed=7)
    rollout, clock = make(plan, candidate)
    rng = random.Random(8)
    traffic(rollout, clock, steps=400, rng=rng, until=Phase.WATCHING)
    assert rollout.state().phase is Phase.WATCHING
    candidate.error_rate = 0.3  # e.g. an upstream feature the new model depends on breaks
    broke_at = clock.now()
    decisions = traffic(rollout, clock, steps=2_000, rng=rng)
    assert [d.action for d in decisions] == [Action.ROLLBACK]
    rollback = decisions[0]
    assert rollback.from_stage == 2 and rollback.phase is Phase.ROLLED_BACK
    assert "harm proven" in rollback.reason and "error rate" in rollback.reason
    # within minutes, though the 5 % holdback sees 10 baseline requests a step
    assert rollback.at - broke_at <= 1800, rollback.at - broke_at
    assert not rollout.assign("u1", {}).is_candidate and rollout.status().watch is None


def test_without_a_holdback_promotion_is_final_as_before() -> None:
    plan = holdback_plan(holdback=None)
    candidate = FakeModel(output=1, seed=9)
    rollout, clock = make(plan, candidate)
    rng = random.Random(10)
    decisions = traffic(rollout, clock, steps=400, rng=rng)
    assert [d.action for d in decisions] == [Action.ADVANCE, Action.PROMOTE]
    assert decisions[-1].phase is Phase.PROMOTED and "watch" not in decisions[-1].reason
    candidate.error_rate = 0.3  # nothing compares any more: nothing to roll back on
    assert traffic(rollout, clock, steps=50, rng=rng) == []
    assert rollout.state().phase is Phase.PROMOTED and rollout.split().traffic == 10_000
    assert next_stage(plan, 1) == (2, Action.PROMOTE)


def test_operator_actions_during_the_watch() -> None:
    plan = holdback_plan()
    rollout, _ = make(plan, FakeModel(output=1))
    # promotion by hand from the first stage enters the watch as well
    rollout.tick()
    d = rollout.promote(actor="alice", reason="urgent fix")
    assert d.phase is Phase.WATCHING and d.to_stage == 2 and "watching 5%" in d.reason
    assert rollout.split().traffic == 9_500
    # pause freezes the split, the holdback included; resume returns to the watch
    rollout.pause(actor="alice")
    assert rollout.split().traffic == 9_500 and rollout.status().watch is not None
    assert rollout.resume(actor="alice").phase is Phase.WATCHING
    with pytest.raises(InvalidTransitionError, match="not awaiting approval"):
        rollout.approve(actor="alice")
    # promoting during the watch ends it
    end = rollout.promote(actor="bob", reason="watched long enough")
    assert end.action is Action.END_WATCH and end.phase is Phase.PROMOTED
    assert "watch ended early by bob (watched long enough)" in end.reason
    assert rollout.split().serve_candidate_to_all


def test_rollback_by_hand_during_the_watch() -> None:
    rollout, _ = make(holdback_plan(), FakeModel(output=1))
    rollout.tick()
    rollout.promote(actor="alice")
    d = rollout.rollback(actor="carol", reason="support tickets")
    assert d.phase is Phase.ROLLED_BACK and not rollout.assign("u1", {}).is_candidate


def test_approval_into_a_holdback_stage_enters_the_watch() -> None:
    data = plan_dict()
    data["stages"][-1].update(holdback="5%", watch="1h", approval="required")
    plan = Plan.from_dict(data)
    rollout, clock = make(plan, FakeModel(output=1))
    traffic(rollout, clock, steps=800, rng=random.Random(11), until=Phase.AWAITING_APPROVAL)
    assert rollout.state().phase is Phase.AWAITING_APPROVAL
    d = rollout.approve(actor="alice")
    assert d.action is Action.PROMOTE and d.phase is Phase.WATCHING
    assert rollout.split().traffic == 9_500


def test_the_watch_survives_a_restart_and_status_shows_it(tmp_path: Any) -> None:
    url = sqlite_url(tmp_path / "watch.db")
    plan = holdback_plan(watch="2h")
    rollout, clock = make(plan, FakeModel(output=1), SQLStore(url))
    traffic(rollout, clock, steps=400, rng=random.Random(12), until=Phase.WATCHING)
    rollout.flush()
    rollout.close()
    again = Rollout.from_plan(plan, store=SQLStore(url), clock=clock,
                              models={"baseline": FakeModel(output=1),
                                      "candidate": FakeModel(output=1)})
    assert again.state().phase is Phase.WATCHING and again.split().traffic == 9_500
    res = CliRunner().invoke(cli, ["status", "--store", url], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "watching" in res.output
    assert "watch after promotion: 5% of units held back on the baseline" in res.output
    res = CliRunner().invoke(cli, ["status", "--store", url, "--json"])
    assert '"holdback": 0.05' in res.output
    again.close()


def test_the_watch_compares_only_the_holdback_period() -> None:
    """During the watch the stage's SRM check expects 95/5, and a clean watch keeps it quiet."""
    rollout, clock = make(holdback_plan(watch="6h"), FakeModel(output=1))
    traffic(rollout, clock, steps=400, rng=random.Random(13), until=Phase.WATCHING)
    traffic(rollout, clock, steps=300, rng=random.Random(14))
    a = rollout.analysis()
    assert a is not None and a.srm is not None and not a.srm.mismatch
    assert a.srm.expected == pytest.approx([0.05, 0.95])
    assert a.n_baseline > 0 and a.n_candidate > 10 * a.n_baseline
    assert rollout.state().phase is Phase.WATCHING
