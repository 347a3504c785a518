"""Every controller decision re-derivable from its stored inputs; snapshots of verdicts."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from tests.conftest import plan_dict
from tests.test_controller import make, run

from safeshift import FakeModel, MemoryStore, Plan, VirtualClock
from safeshift.analysis import analyse
from safeshift.errors import SafeshiftError
from safeshift.explain import apply_what_if, explain, explain_lines, parse_what_if
from safeshift.snapshots import SNAPSHOT_EVERY, SNAPSHOT_FIELDS, decode_inputs
from safeshift.state import Action
from safeshift.store import SQLStore, Store, sqlite_url
from safeshift.telemetry import Summary


def _segmented_plan() -> Plan:
    return Plan.from_dict(plan_dict(
        segments=["country"],
        guardrails=[{"metric": "error_rate", "tolerance": 0.02},
                    {"metric": "latency_ms", "above": 250, "tolerance": 0.05}]))


def test_every_controller_decision_is_re_derived_exactly(store: Store) -> None:
    clock = VirtualClock()
    plan = _segmented_plan()
    rollout = make(plan, store, clock, candidate=FakeModel(output=1))
    decisions = run(rollout, clock)
    assert [d.action for d in decisions] == [Action.ADVANCE, Action.PROMOTE]
    for d in store.decisions(plan.rollout):
        e = explain(store, plan.rollout, d.seq)
        if d.action is Action.START:
            assert e.kind == "unrecorded" and e.matches is None
            continue
        assert e.kind == "controller"
        assert e.matches, e.differences
        assert e.rederived is not None and e.rederived.intent is not None
        assert e.rederived.intent.action is d.action
        assert "MATCHES" in "\n".join(explain_lines(e))


def test_a_rollback_is_re_derived_and_a_what_if_flips_it() -> None:
    clock, store = VirtualClock(), MemoryStore()
    plan = _segmented_plan()
    rollout = make(plan, store, clock, candidate=FakeModel(output=2, error_rate=0.3))
    decisions = run(rollout, clock)
    assert decisions[-1].action is Action.ROLLBACK
    seq = decisions[-1].seq
    e = explain(store, plan.rollout, seq)
    assert e.matches, e.differences
    # the same evidence against a tolerance of 40 points: nothing is proven, so it holds
    flipped = explain(store, plan.rollout, seq, what_if={"tolerance.error_rate": 0.4})
    assert flipped.changed is True and flipped.what_if_result is not None
    assert flipped.what_if_result.intent is None
    assert "WOULD HAVE CHANGED" in "\n".join(explain_lines(flipped))
    # a tighter tolerance keeps the decision
    same = explain(store, plan.rollout, seq, what_if={"tolerance.error_rate": 0.01})
    assert same.changed is False
    assert same.what_if_result is not None and same.what_if_result.action == "rollback"


def test_altered_inputs_are_caught_by_their_digest(tmp_path: Path) -> None:
    clock = VirtualClock()
    store = SQLStore(sqlite_url(tmp_path / "s.db"))
    plan = _segmented_plan()
    rollout = make(plan, store, clock, candidate=FakeModel(output=2, error_rate=0.3))
    seq = run(rollout, clock)[-1].seq
    body = store.decision_inputs(plan.rollout, seq)
    assert body is not None
    doc = decode_inputs(body)
    # soften the candidate's errors in the stored summary: the digest no longer matches
    for row in doc["summary"]["pooled"]:
        if row[0] == "candidate" and row[2] == "error_rate":
            row[6] = 0.0
    forged = zlib.compress(json.dumps(doc).encode())
    from safeshift.store.sql import inputs_t

    with store.engine.begin() as conn:
        conn.execute(inputs_t.update().values(body=forged))
    e = explain(store, plan.rollout, seq)
    assert e.matches is False and "SHA-256" in e.differences[0]
    store.close()


def test_frozen_summary_reads_exactly_like_the_original() -> None:
    clock, store = VirtualClock(), MemoryStore()
    plan = _segmented_plan()
    rollout = make(plan, store, clock, candidate=FakeModel(output=1, error_rate=0.01))
    rng = random.Random(1)
    for _ in range(2000):
        rollout.predict({"x": 1}, unit=f"u{rng.randrange(300)}",
                        context={"country": rng.choice(["US", "BR", "IN"])})
    rollout.flush()
    rows = store.telemetry_totals(plan.rollout, 0)
    original = Summary.from_rows(rows)
    frozen = Summary.from_json(json.loads(json.dumps(original.to_json())))
    assert frozen.arms() == original.arms() and frozen.segment_values() == original.segment_values()
    a = analyse(plan, 0, original).to_json()
    b = analyse(plan, 0, frozen).to_json()
    assert a == b
    assert any(v["segment"] for v in a["verdicts"])  # the segments were judged too


def test_operator_action_is_explained_as_a_person_s(store: Store) -> None:
    clock = VirtualClock()
    plan = Plan.from_dict(plan_dict())
    rollout = make(plan, store, clock, candidate=FakeModel(output=1))
    for i in range(200):
        rollout.predict({"x": 1}, unit=f"u{i}")
    clock.advance(SNAPSHOT_EVERY)
    rollout.tick()
    rollout.pause(actor="alice", reason="looks odd")
    seq = store.get_state(plan.rollout).seq
    e = explain(store, plan.rollout, seq)
    assert e.kind == "operator" and e.matches is None and e.before is not None
    text = "\n".join(explain_lines(e))
    assert "alice" in text and "a person's action" in text


def test_snapshots_once_a_minute_and_at_each_decision(store: Store) -> None:
    clock = VirtualClock()
    plan = _segmented_plan()
    rollout = make(plan, store, clock, candidate=FakeModel(output=1))
    decisions = run(rollout, clock)  # ticks every 10 s
    snaps = store.snapshots(plan.rollout)
    times = [s.at for s in snaps]
    assert times == sorted(times) and len(times) >= 5
    decided = {d.at for d in decisions if d.actor == "controller"}
    assert decided <= set(times)  # one at every decision
    gaps = [b - a for a, b in itertools.pairwise(times) if b not in decided]
    assert gaps and min(gaps) >= SNAPSHOT_EVERY
    row = snaps[-1].body["verdicts"][0]
    assert len(row) == len(SNAPSHOT_FIELDS) and row[0] == "error_rate"
    assert store.last_snapshot_at(plan.rollout) == times[-1]
    assert store.snapshots(plan.rollout, since=times[-2]) == snaps[-2:]


def test_what_if_settings_are_parsed_and_checked() -> None:
    plan = _segmented_plan()
    assert parse_what_if(["alpha=0.01", "tolerance.error_rate=0.005"]) == {
        "alpha": 0.01, "tolerance.error_rate": 0.005}
    changed = apply_what_if(plan, {"alpha": 0.01, "tolerance.latency_ms>250": 0.1,
                                   "stage.canary.min_samples": 50})
    assert changed.analysis.alpha == 0.01
    assert [g.tolerance for g in changed.guardrails] == [0.02, 0.1]
    assert changed.stages[0].min_samples == 50
    with pytest.raises(SafeshiftError, match="no guardrail 'nope'"):
        apply_what_if(plan, {"tolerance.nope": 1})
    with pytest.raises(SafeshiftError, match="unknown setting"):
        apply_what_if(plan, {"colour": "red"})
    with pytest.raises(SafeshiftError, match="invalid plan"):
        apply_what_if(plan, {"alpha": 7})
    with pytest.raises(SafeshiftError, match="KEY=VALUE"):
        parse_what_if(["alpha"])


def test_cli_explain_exit_codes(tmp_path: Path) -> None:
    clock = VirtualClock()
    db = tmp_path / "s.db"
    store = SQLStore(sqlite_url(db))
    plan = _segmented_plan()
    rollout = make(plan, store, clock, candidate=FakeModel(output=2, error_rate=0.3))
    seq = run(rollout, clock)[-1].seq
    store.close()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "safeshift.cli", "explain", *args,
                               "--store", str(db)], capture_output=True, text=True, timeout=120)

    every = cli(plan.rollout)
    assert every.returncode == 0, every.stderr
    assert every.stdout.count("MATCHES the stored decision exactly") == 1
    flipped = cli(f"{plan.rollout}#{seq}", "--what-if", "tolerance.error_rate=0.4")
    assert flipped.returncode == 0 and "WOULD HAVE CHANGED" in flipped.stdout
    as_json = cli(plan.rollout, str(seq), "--json")
    assert json.loads(as_json.stdout)[0]["matches"] is True
    missing = cli(f"{plan.rollout}#99")
    assert missing.returncode == 2 and "no decision 99" in missing.stderr
    bad = cli(f"{plan.rollout}#{seq}", "--what-if", "alpha")
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr
