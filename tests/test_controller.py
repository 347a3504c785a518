from __future__ import annotations

import random
from typing import Any

import pytest
from tests.conftest import plan_dict

from safeshift import FakeModel, InvalidTransitionError, Phase, Plan, Rollout, VirtualClock
from safeshift.audit import verify_chain
from safeshift.controller import next_stage
from safeshift.state import Action
from safeshift.store import Store
from safeshift.telemetry import Summary

COUNTRIES = ["US", "BR", "IN", "GB"]


def run(rollout: Rollout, clock: VirtualClock, *, steps: int = 400, per_step: int = 60,
        seed: int = 3, approve: bool = True) -> list[Any]:
    rng = random.Random(seed)
    decisions = []
    for _ in range(steps):
        for _ in range(per_step):
            unit = f"u{rng.randrange(1_000_000)}"
            rollout.predict({"x": 1}, unit=unit, context={"country": rng.choice(COUNTRIES)})
        clock.advance(10)
        d = rollout.tick()
        if d is not None:
            decisions.append(d)
        state = rollout.state()
        if state.phase.terminal:
            break
        if approve and state.phase is Phase.AWAITING_APPROVAL:
            decisions.append(rollout.approve(actor="alice"))
    return decisions


def make(plan: Plan, store: Store, clock: VirtualClock, *, candidate: FakeModel) -> Rollout:
    return Rollout.from_plan(plan, store=store, clock=clock,
                             models={"baseline": FakeModel(output=1), "candidate": candidate})


def test_good_candidate_is_promoted_stage_by_stage(plan: Plan, store: Store,
                                                   clock: VirtualClock) -> None:
    rollout = make(plan, store, clock, candidate=FakeModel(output=1))
    decisions = run(rollout, clock)
    assert [d.action for d in decisions] == [Action.ADVANCE, Action.PROMOTE]
    assert rollout.state().phase is Phase.PROMOTED
    assert decisions[0].evidence["verdicts"][0]["status"] == "pass"
    assert all(d.at - 0 >= 0 for d in decisions)
    assert verify_chain(store.audit_events(plan.rollout))[0]
    # the promoted split serves the candidate to everyone
    assert rollout.assign("anyone", {}).is_candidate


def test_failing_candidate_is_rolled_back_and_users_get_the_baseline(
        plan: Plan, store: Store, clock: VirtualClock) -> None:
    rollout = make(plan, store, clock, candidate=FakeModel(output=2, error_rate=0.3))
    served = [rollout.predict({"x": 1}, unit=f"u{i}") for i in range(300)]
    assert all(p.outputs == [1] or (p.arm == "candidate" and p.outputs == [2]) for p in served)
    assert any(p.fallback for p in served)
    decisions = run(rollout, clock)
    assert decisions[-1].action is Action.ROLLBACK
    assert "error rate" in decisions[-1].reason and "tolerance" in decisions[-1].reason
    assert not rollout.assign("u1", {}).is_candidate


def test_segment_fault_is_named() -> None:
    clock = VirtualClock()
    from safeshift import MemoryStore

    plan = Plan.from_dict(plan_dict())
    rollout = Rollout.from_plan(plan, store=MemoryStore(), clock=clock,
                                models={"baseline": FakeModel(), "candidate": FakeModel()})
    # 8% errors in BR only: globally 2 pt, not proven beyond the 2 pt tolerance; in BR, 8 pt
    bad = FakeModel(error_rate=0.08, seed=1)
    good = FakeModel()
    rng = random.Random(5)
    for _ in range(400):
        for _ in range(150):
            country = rng.choice(COUNTRIES)
            a = rollout.assign(f"u{rng.randrange(10**6)}", {"country": country})
            model = bad if (a.is_candidate and country == "BR") else good
            rollout.recorder.record(a, model.predict([{}]), context={"country": country})
        clock.advance(10)
        d = rollout.tick()
        if d is not None and d.action is Action.ROLLBACK:
            assert "country=BR" in d.reason
            harms = [v for v in d.evidence["verdicts"] if v["status"] == "harm"]
            assert {v["segment"] for v in harms} >= {"country=BR"}
            return
    pytest.fail("the segment fault was not rolled back")


def test_approval_gate_waits_for_a_person(store: Store, clock: VirtualClock) -> None:
    data = plan_dict()
    data["stages"][1]["approval"] = "required"
    plan = Plan.from_dict(data)
    rollout = make(plan, store, clock, candidate=FakeModel(output=1))
    decisions = run(rollout, clock, approve=False, steps=200)
    assert decisions[-1].action is Action.AWAIT_APPROVAL
    assert rollout.state().pending_stage == 1
    assert rollout.state().stage_index == 0  # the previous stage keeps running
    with pytest.raises(InvalidTransitionError):
        rollout.resume(actor="bob")
    d = rollout.approve(actor="bob", reason="looks fine")
    assert d.actor == "bob" and rollout.state().stage_index == 1
    assert rollout.state().phase is Phase.RUNNING


def test_pause_resume_and_terminal_actions(plan: Plan, store: Store, clock: VirtualClock) -> None:
    rollout = make(plan, store, clock, candidate=FakeModel(output=1))
    rollout.pause(actor="carol", reason="investigating")
    clock.advance(3600)
    assert rollout.tick() is None  # paused: no automatic decision
    rollout.resume(actor="carol")
    assert rollout.state().phase is Phase.RUNNING
    rollout.rollback(actor="carol", reason="manual")
    with pytest.raises(InvalidTransitionError, match="already rolled_back"):
        rollout.promote(actor="carol")
    assert [e.action for e in store.audit_events(plan.rollout)] == [
        "start", "pause", "resume", "rollback"]


def test_inconclusive_stage_follows_the_plan(store: Store, clock: VirtualClock) -> None:
    data = plan_dict()
    data["stages"][0]["max_duration"] = "20m"
    data["analysis"]["on_inconclusive"] = "rollback"
    plan = Plan.from_dict(data)
    rollout = make(plan, store, clock, candidate=FakeModel(output=1))
    decisions = run(rollout, clock, per_step=1, steps=200)  # a trickle: never conclusive
    assert decisions[-1].action is Action.ROLLBACK
    assert "max_duration" in decisions[-1].reason


def test_low_traffic_holds_and_never_fails(plan: Plan, store: Store, clock: VirtualClock) -> None:
    rollout = make(plan, store, clock, candidate=FakeModel(output=1))
    decisions = run(rollout, clock, per_step=1, steps=150)
    assert decisions == []
    assert rollout.state().phase is Phase.RUNNING


def test_sample_ratio_mismatch_pauses(plan: Plan, store: Store, clock: VirtualClock) -> None:
    rollout = make(plan, store, clock, candidate=FakeModel(output=1))
    base = FakeModel(output=1)
    for i in range(4000):
        a = rollout.assign(f"u{i}", {})
        if a.is_candidate and i % 2:  # half the candidate's telemetry goes missing
            continue
        rollout.recorder.record(a, base.predict([{}]))
    clock.advance(600)
    d = rollout.tick()
    assert d is not None and d.action is Action.PAUSE
    assert "sample-ratio mismatch" in d.reason and " units, expected" in d.reason


def test_sample_ratio_counts_units_so_heavy_users_do_not_pause(plan: Plan, store: Store,
                                                                clock: VirtualClock) -> None:
    """The split is by unit: one very active user on either arm skews the request share but
    not the unit share the check counts."""
    rollout = make(plan, store, clock, candidate=FakeModel(output=1))
    rollout.tick()  # start: the first stage sends its share of units to the candidate
    base = FakeModel(output=1)
    arms = {}
    for i in range(3000):
        a = rollout.assign(f"u{i}", {})
        arms[f"u{i}"] = a.arm
        rollout.recorder.record(a, base.predict([{}]))
    heavy = next(u for u, arm in arms.items() if arm == "candidate")
    for _ in range(3000):  # one user sends as many requests as everyone else together
        rollout.recorder.record(rollout.assign(heavy, {}), base.predict([{}]))
    rollout.flush()
    analysis = rollout.analysis()
    assert analysis.srm is not None and analysis.srm_counted == "units"
    assert sum(analysis.srm.counts) == 3000  # each unit once
    assert analysis.srm.counts[1] == sum(arm == "candidate" for arm in arms.values())
    assert not analysis.srm.mismatch
    # counted by request, the same traffic would look like a broken split
    from safeshift.stats import srm_test

    requests = [analysis.n_baseline, analysis.n_candidate]
    assert srm_test([int(n) for n in requests], list(analysis.srm.expected), alpha=0.001).mismatch
    clock.advance(600)
    rollout.tick()


def test_units_counted_again_by_other_replicas_widen_the_split_check(plan: Plan, store: Store,
                                                                     clock: VirtualClock) -> None:
    """Three more replicas with recorders of their own (each counts a unit on its first sight)
    share the store: units are counted up to four times, the counts' dispersion is measured
    from their clusters and reported, and the split check divides by it."""
    from safeshift.recorder import Recorder

    rollout = make(plan, store, clock, candidate=FakeModel(output=1))
    rollout.tick()
    recorders = [rollout.recorder] + [Recorder(rollout.plan, clock) for _ in range(3)]
    base, rng = FakeModel(output=1), random.Random(5)
    for i in range(3000):
        a = rollout.assign(f"u{i}", {})
        for _ in range(rng.choice([1, 2, 8, 20])):
            rng.choice(recorders).record(a, base.predict([{}]))
    for r in recorders:
        r.flush(store)
    analysis = rollout.analysis()
    assert analysis.srm is not None and analysis.srm_counted == "units"
    assert sum(analysis.srm.counts) > 1.8 * 3000  # most units counted by several replicas
    assert 1.5 < analysis.srm.dispersion < 4.0
    assert analysis.to_json()["srm"]["dispersion"] == analysis.srm.dispersion
    assert not analysis.srm.mismatch
    assert rollout.state().phase is not Phase.PAUSED
    rollout.close()


def test_next_stage_schedule() -> None:
    data = plan_dict()
    data["stages"][1]["approval"] = "required"
    plan = Plan.from_dict(data)
    assert next_stage(plan, 0) == (1, Action.AWAIT_APPROVAL)
    assert next_stage(plan, 1) == (2, Action.PROMOTE)  # entering 100% is promotion
    short = Plan.from_dict(plan_dict(stages=[{"name": "only", "traffic": "20%"}]))
    assert next_stage(short, 0) == (0, Action.PROMOTE)


def test_shadow_labels_are_recorded_as_pairs(store: Store, clock: VirtualClock) -> None:
    data = plan_dict(guardrails=[{"metric": "accuracy", "tolerance": 0.02}])
    data["stages"][0] = {"name": "shadow", "shadow": "100%", "min_samples": 10}
    plan = Plan.from_dict(data)
    rollout = make(plan, store, clock, candidate=FakeModel(output=0))
    ids = [rollout.predict({"x": 1}, unit=f"u{i}").id for i in range(50)]
    assert all(rollout.predict({"x": 1}, unit="u1").arm == "baseline" for _ in range(3))
    results = rollout.feedback_many([{"id": i, "label": 1} for i in ids])
    assert all(r.accepted == ["accuracy"] for r in results)
    paired = Summary.from_rows(store.telemetry(plan.rollout, 0)).pooled("candidate", "accuracy:paired")
    assert paired.n == 50 and paired.s == -50  # the candidate is wrong where the baseline is right
    # each pair counts in its unit's cluster: 50 units over 64 clusters fill more than 30
    assert sum(n for n, _ in paired.clusters.values()) == 50 and len(paired.clusters) > 30
    rollout.close()


def test_a_label_list_must_match_the_rows(store: Store, clock: VirtualClock) -> None:
    plan = Plan.from_dict(plan_dict())
    rollout = make(plan, store, clock, candidate=FakeModel(output=1))
    rid = rollout.predict([{"x": 1}, {"x": 2}, {"x": 3}], unit="u1").id
    one = rollout.predict({"x": 1}, unit="u2").id
    with pytest.raises(ValueError, match=r"item 1: .* had 3 rows but 2 labels"):
        rollout.feedback_many([{"id": one, "label": 1}, {"id": rid, "label": [1, 1]}])
    with pytest.raises(ValueError, match="list of 3 labels"):
        rollout.feedback(rid, label=1)
    assert rollout.feedback(one, label=1).accepted == ["accuracy"]  # the batch stored nothing
    assert rollout.feedback(rid, label=[1, 0, 1]).accepted == ["accuracy"]
    rollout.close()


def test_request_records_expire_after_the_label_window(store: Store, clock: VirtualClock) -> None:
    from safeshift import UnknownRequestError

    plan = Plan.from_dict(plan_dict(serving={"label_window": "10m"}))
    rollout = make(plan, store, clock, candidate=FakeModel(output=1))
    old = rollout.predict({"x": 1}, unit="u1").id
    rollout.flush()
    clock.advance(300)
    assert rollout.feedback(old, label=1).accepted == ["accuracy"]  # inside the window
    clock.advance(400)
    with pytest.raises(UnknownRequestError, match="past its label window"):
        rollout.feedback(old, label=0)
    rollout.tick()  # retention: the controller purges expired records
    assert store.get_request(old) is None
    with pytest.raises(UnknownRequestError, match="never served"):
        rollout.feedback(old, label=0)


def test_in_process_predict_enforces_the_candidate_timeout(store: Store,
                                                           clock: VirtualClock) -> None:
    import time as _time

    data = plan_dict(targeting={"always_candidate": {"plan": ["internal"]}})
    data["candidate"]["timeout"] = "50ms"
    plan = Plan.from_dict(data)
    rollout = make(plan, store, clock, candidate=FakeModel(output=2, latency_ms=1000))
    start = _time.perf_counter()
    p = rollout.predict({"x": 1}, unit="u1", context={"plan": "internal"})
    assert _time.perf_counter() - start < 0.8
    assert p.fallback and p.arm == "baseline" and p.outputs == [1]
    rollout.flush()
    errors = [r for r in store.telemetry(plan.rollout) if r.signal == "error_rate"
              and r.arm == "candidate"]
    assert sum(r.s for r in errors) == 1  # counted against the candidate
    rollout.close()


def test_audit_verification_catches_removed_and_altered_records(plan: Plan, store: Store,
                                                                clock: VirtualClock) -> None:
    from safeshift.audit import verify_rollout

    rollout = make(plan, store, clock, candidate=FakeModel(output=1))
    rollout.pause(actor="ann")
    rollout.resume(actor="ann")
    state, events, decisions = rollout.state(), store.audit_events(plan.rollout), rollout.decisions()
    assert verify_rollout(state, events, decisions)[0]
    ok, message = verify_rollout(state, events[:-1], decisions[:-1])
    assert not ok and "missing" in message
    decisions[1].actor = "mallory"
    ok, message = verify_rollout(state, events, decisions)
    assert not ok and "decision 2 does not match" in message


def test_status_counts_stage_time_until_the_rollout_finished(store: Store,
                                                             clock: VirtualClock) -> None:
    plan = Plan.from_dict(plan_dict())
    rollout = make(plan, store, clock, candidate=FakeModel(output=1))
    rollout.tick()
    clock.advance(90)
    assert rollout.status().stage_elapsed == pytest.approx(90)
    rollout.rollback(actor="ops", reason="drill")
    clock.advance(10_000)  # later reads of a finished rollout: the stage ended at the rollback
    status = rollout.status()
    assert status.phase is Phase.ROLLED_BACK and status.stage_elapsed == pytest.approx(90)
    rollout.close()


def test_of_two_controllers_with_leases_one_decides_until_its_lease_lapses() -> None:
    from safeshift import MemoryStore
    from safeshift.controller import Controller, Lease

    store, clock = MemoryStore(), VirtualClock()
    plan = Plan.from_dict(plan_dict())
    Rollout.from_plan(plan, store=store, clock=clock, start=False)
    a = Controller(plan, store, clock, lease=Lease("replica-a", ttl=30))
    b = Controller(plan, store, clock, lease=Lease("replica-b", ttl=30))
    assert a.tick() is not None  # a takes the lease and starts the rollout
    clock.advance(10)
    assert not b.holds_lease() and b.tick() is None
    assert a.holds_lease()  # renewed: until t=40
    clock.advance(25)  # t=35
    assert not b.holds_lease()
    clock.advance(10)  # t=45: a was silent past its ttl (e.g. killed), b takes over
    assert b.holds_lease() and not a.holds_lease()
    assert Controller(plan, store, clock).holds_lease()  # no lease: a library's own controller
